"""One Settings object, built once at start-up (env + CLI) and passed down.

Environment variables use the prefix ``LORASWAP_`` and ``__`` for nesting, e.g.
``LORASWAP_ENGINE__MAX_LORA_RANK=32``. The CLI (server/cli.py) overrides the same fields.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# vLLM accepts only these LoRA ranks for its preallocated slots.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_LORA_RANKS = get_args(LoraRank)


class EngineSettings(BaseModel):
    """Knobs passed to vLLM. Defaults suit the 135M demo model on a 2-core CPU."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Compute dtype. float32 makes outputs comparable bit-for-bit."
    )
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + output).")
    max_num_seqs: int = Field(32, ge=1, description="Max sequences per engine step.")
    max_loras: int = Field(4, ge=1, description="Distinct adapters in one engine step.")
    max_cpu_loras: int = Field(
        16, ge=1, description="Adapters kept loaded in engine memory (LRU beyond)."
    )
    max_lora_rank: LoraRank = Field(
        16, description=f"Largest adapter rank: one of {VLLM_LORA_RANKS}."
    )
    kv_cache_gib: int = Field(1, ge=1, description="KV cache size in whole GiB (CPU backend).")
    cpu_threads_bind: str = Field(
        "auto",
        description="CPU cores for vLLM's compute threads ('0-1', ...); 'auto' = all cores.",
    )
    lora_fix: bool = Field(
        True, description="Apply our CPU multi-LoRA fix (vLLM plugin); off only for tests."
    )
    lora_fast: bool = Field(
        True,
        description="On top of the fix, our step-planned fast CPU LoRA path "
        "(server/engine/lora/); off: the fixed per-op path.",
    )
    enforce_eager: bool = Field(False, description="Disable compilation / graphs.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one engine spans (vLLM's tensor parallelism); 1 on CPU."
    )
    scheduling_policy: Literal["priority", "fcfs"] = Field(
        "priority",
        description="'priority' lets a tenant's first request go ahead of another tenant's "
        "queue (fairness); 'fcfs' is vLLM's default.",
    )


class OpenAISettings(BaseModel):
    """vLLM's OpenAI layer: the same options as `vllm serve`'s flags of the same names."""

    chat_template: str | None = Field(
        None,
        description="Chat template (a file, or the template itself) instead of the model's own.",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool-call parser for tool_choice 'auto' (hermes, llama3_json, "
        "...); named and 'required' tool choice work without one.",
    )
    enable_auto_tool_choice: bool = Field(
        False, description="Let the model call tools by itself (needs tool_call_parser)."
    )
    structured_outputs_backend: Literal[
        "auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"
    ] = Field("auto", description="vLLM's structured-outputs backend (JSON schema, ...).")
    structured_outputs_disable_any_whitespace: bool = Field(
        False,
        description="Structured outputs emit compact JSON (no free whitespace): small "
        "models otherwise tend to pad with newlines until max_tokens.",
    )

    @model_validator(mode="after")
    def _auto_tools_need_a_parser(self) -> OpenAISettings:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice requires tool_call_parser")
        if self.structured_outputs_disable_any_whitespace and (
            self.structured_outputs_backend not in ("xgrammar", "guidance")
        ):
            raise ValueError(
                "structured_outputs_disable_any_whitespace needs the xgrammar or guidance "
                "backend (vLLM's rule)"
            )
        return self


class RegistrySettings(BaseModel):
    """Where the adapter registry lives."""

    database_url: str | None = Field(
        None,
        description="Registry database: sqlite:///path/registry.db, or postgresql://... "
        "shared by several replicas [SQLite file registry_db].",
    )
    refresh_interval_s: float = Field(
        2.0,
        ge=0,
        description="How often to look for other replicas' registry changes; 0 = never.",
    )


class ExperimentsSettings(BaseModel):
    """A/B experiments: the exposure log of requests served through aliases (README:
    Experiments)."""

    exposure_log: bool = Field(
        True, description="Record one exposure row per request served through an alias."
    )
    queue_max: int = Field(
        10_000,
        ge=1,
        description="Exposures waiting to be written at most; past it new ones are dropped "
        "and counted (loraswap_exposures_dropped), never delaying a request.",
    )
    batch_size: int = Field(500, ge=1, description="Exposures written per transaction at most.")
    flush_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often waiting exposures are written (sooner when a batch is full).",
    )
    retention_days: float | None = Field(
        90.0,
        gt=0,
        description="Exposures (and their feedback) older than this are deleted; none = kept.",
    )
    max_rows: int | None = Field(
        10_000_000, ge=1, description="Exposures kept at most (the oldest go first); none = no cap."
    )
    prune_interval_s: float = Field(300.0, gt=0, description="How often retention runs.")
    shadow_max_busy: int = Field(
        1,
        ge=0,
        description="Shadow runs start only while at most this many client requests are "
        "in flight, and running ones are aborted past it (dropped, counted); 0 = only on "
        "an idle server.",
    )
    shadow_max_running: int = Field(
        1, ge=1, description="Shadow runs at once at most; past it new ones are dropped."
    )


class SourcesSettings(BaseModel):
    """Where adapters may be registered from, besides paths and uploads (README: Sources)."""

    download_timeout_s: float = Field(
        300.0, gt=0, description="Total time one download (both files) may take."
    )
    download_workers: int = Field(
        4, ge=1, description="Downloads running at once (their own thread pool)."
    )
    http_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Non-public networks http(s) sources may reach, e.g. 10.0.0.0/8 "
        "(loopback, private and link-local addresses are refused otherwise).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, SeaweedFS, Ceph, R2); none = AWS."
    )
    s3_region: str | None = Field(None, description="S3 region [the AWS default chain's].")
    s3_profile: str | None = Field(
        None, description="AWS profile for S3 credentials [environment / instance role]."
    )
    s3_anonymous: bool = Field(False, description="Unsigned S3 requests (public buckets).")
    hf_enabled: bool = Field(False, description="Accept hf://org/repo[@revision] sources.")
    hf_endpoint: str | None = Field(None, description="Hugging Face hub URL [the hub's default].")

    @field_validator("http_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError: refused at start
        return value


class RaySettings(BaseModel):
    """`loraswap serve --ray` and Ray's own tooling (server/ray_serve.py: app_builder)."""

    address: str | None = Field(
        None,
        description="Ray cluster to join (`auto`, `host:port`, `ray://host:10001`); unset: "
        "RAY_ADDRESS if set, else a local Ray started for the server.",
    )
    replicas: int = Field(2, ge=1, description="Engine replicas (a fixed count).")
    min_replicas: int | None = Field(
        None, ge=0, description="With max_replicas: Ray Serve's autoscaler's lower bound."
    )
    max_replicas: int | None = Field(
        None, ge=1, description="Set: replicas autoscale (Ray Serve) up to this many."
    )
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Autoscaling: requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="Autoscaling: load lasting this long adds replicas."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="Autoscaling: idleness lasting this long removes replicas."
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="At most this many replicas on one Ray node (1: one per node, each "
        "binding all of its node's cores); unset: no limit.",
    )
    adapters_per_replica: int | None = Field(
        None, ge=1, description="Adapter versions one replica keeps loaded [engine.max_cpu_loras]."
    )
    gpus_per_replica: float | None = Field(
        None,
        ge=0,
        description="Ray `num_gpus` of a replica; unset: engine.tensor_parallel_size on a GPU "
        "build of vLLM (as seen where the application is built), 0 on CPU.",
    )
    coordinator_timeout_s: float = Field(
        2.0, gt=0, description="Longest wait for the shared quota state; past it, 503."
    )
    beat_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often a replica renews its quota tickets and publishes its metrics.",
    )
    replica_ttl_s: float = Field(
        15.0,
        gt=0,
        description="A replica silent this long is gone: its tickets freed, its metrics dropped.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> RaySettings:
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError("ray.min_replicas must not exceed ray.max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None


class Settings(BaseSettings):
    """Server configuration. Every field is documented in README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="LORASWAP_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(
        Path.home() / ".cache" / "loraswap",
        description="Cache directory for demo assets and downloads.",
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    model: Path | None = Field(None, description="Base model folder (safetensors, tokenizer).")
    served_model_name: str = Field("smollm2", description="Name of the base in the API.")
    adapters_dir: Path | None = Field(
        None, description="Folder of PEFT adapter folders, one per adapter name."
    )
    max_adapter_bytes: int = Field(
        512 * 1024 * 1024, ge=1, description="Size cap of one adapter's weights."
    )
    max_tokens_cap: int = Field(
        4096, ge=1, description="Upper bound on max_tokens a request may ask for."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body (uploads: max_adapter_bytes)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long running requests may take to finish."
    )
    metrics_max_label_values: int = Field(
        100, ge=1, description="Distinct adapters/tenants labelled in metrics; the rest 'other'."
    )
    max_in_flight: int = Field(
        256, ge=1, description="Inference requests in the server at once; past it, 503."
    )
    unsafe_allow_open_network: bool = Field(
        False,
        description="Serve without API keys on a non-loopback address (anyone can use it).",
    )
    admin_key: SecretStr | None = Field(
        None, description="Bearer key of the /admin API; unset = admin API refused (403)."
    )
    metrics_key: SecretStr | None = Field(
        None,
        description="Bearer key of /metrics (the admin key works too); with neither set, "
        "/metrics answers only the callers open mode serves.",
    )
    limit_concurrency: int = Field(
        512,
        ge=1,
        description="Connections and requests uvicorn handles at once; past it, 503 "
        "(bounds the memory bodies can take: about this times max_body_bytes).",
    )
    registry_db: Path | None = Field(
        None, description="SQLite file of the adapter registry [<home>/registry.db]."
    )
    storage_dir: Path | None = Field(
        None, description="Uploaded adapters and the download cache [<home>/registry]."
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Folders adapters may be registered from by path (adapters_dir is one).",
    )
    download_cache_bytes: int = Field(
        2 * 1024**3, ge=1, description="Cap of the on-disk cache of downloaded adapters."
    )
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    sources: SourcesSettings = Field(default_factory=SourcesSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    experiments: ExperimentsSettings = Field(default_factory=ExperimentsSettings)
    ray: RaySettings = Field(default_factory=RaySettings)

    @model_validator(mode="after")
    def _one_registry_database(self) -> Settings:
        if self.registry_db is not None and self.registry.database_url is not None:
            raise ValueError("set registry_db or registry.database_url, not both")
        return self

    @property
    def registry_db_path(self) -> Path:
        return self.registry_db or self.home / "registry.db"

    @property
    def registry_database(self) -> str | Path:
        """The registry database URL if one is set, else the SQLite file (a Path)."""
        return self.registry.database_url or self.registry_db_path

    @property
    def storage_path(self) -> Path:
        return self.storage_dir or self.home / "registry"

    @property
    def adapter_roots(self) -> tuple[Path, ...]:
        roots = list(self.allowed_roots)
        if self.adapters_dir is not None:
            roots.append(self.adapters_dir)
        return tuple(roots)
