"""`loraswap serve` and `loraswap demo prepare`: run the server, build the offline demo assets."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn
from rich.console import Console

from server.lifecycle import Lifecycle
from server.settings import OpenAISettings, Settings

demo_app = typer.Typer(help="Offline demo assets (base model, adapters, quantized base).")
console = Console(stderr=True)

HomeOpt = Annotated[
    Path | None, typer.Option(help="Cache directory (env LORASWAP_HOME).", show_default=False)
]


def _settings(**top: Any) -> Settings:
    """Build the one Settings object: environment first, then explicit CLI flags
    (`engine_x` / `openai_x` / `ray_x` set field x of that section; None or False: not
    given)."""
    base = Settings().model_dump()
    for section in ("engine", "openai", "ray"):
        keys = [k for k in top if k.startswith(f"{section}_")]
        for key in keys:
            value = top.pop(key)
            if _given(value):
                base[section][key.removeprefix(f"{section}_")] = value
    update = {k: v for k, v in top.items() if _given(v)}
    return Settings.model_validate({**base, **update})


def _given(value: object) -> bool:
    # A flag left off is None, or False for an on/off flag: the environment decides.
    return value is not None and value is not False


def _prepare_demo(home: Path, only: set[str] | None = None) -> Any:
    from server.demo import prepare

    start = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - start:6.1f}s[/dim] {message}")

    assets = prepare(home, progress=progress, only=only)
    console.print(f"demo assets ready in {time.perf_counter() - start:.1f}s under {home}/demo")
    return assets


def _demo_openai(given: OpenAISettings) -> OpenAISettings:
    """The demo serves tools and structured outputs out of the box (what the e2e tests
    run): SmolLM2 has no tool-call format of its own, so the pythonic parser, whose named
    and `required` tool choice vLLM constrains by the tool's JSON schema; compact JSON, as
    a 135M model otherwise pads JSON with newlines. Whatever the operator set wins."""
    if given != OpenAISettings():
        return given
    return OpenAISettings(
        tool_call_parser="pythonic",
        enable_auto_tool_choice=True,
        structured_outputs_backend="xgrammar",
        structured_outputs_disable_any_whitespace=True,
    )


@demo_app.command("prepare")
def demo_prepare(home: HomeOpt = None) -> None:
    """Build (or reuse) the demo base model, its quantized copy and the demo adapters."""
    settings = _settings(home=home)
    _prepare_demo(settings.home)


Model = Annotated[Path | None, typer.Option(help="Base model folder.")]
AdaptersDir = Annotated[Path | None, typer.Option(help="Folder of adapters.")]
ServedName = Annotated[str | None, typer.Option(help="Base name in the API.")]
Host = Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")]
Port = Annotated[int | None, typer.Option(help="Port (default 8000).")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="auto|bfloat16|float16|float32.")]
MaxLoraRank = Annotated[int | None, typer.Option("--max-lora-rank", help="Largest adapter rank.")]
MaxLoras = Annotated[int | None, typer.Option("--max-loras", help="Adapters per engine step.")]
MaxModelLen = Annotated[int | None, typer.Option("--max-model-len", help="Context length.")]
OpenNetwork = Annotated[
    bool, typer.Option(help="Allow serving without API keys on a non-loopback address.")
]
KvCacheGib = Annotated[int | None, typer.Option("--kv-cache-gib", help="KV cache GiB (CPU).")]
ChatTemplate = Annotated[
    str | None,
    typer.Option("--chat-template", help="As vllm serve: a chat template file (or text)."),
]
ToolCallParser = Annotated[
    str | None,
    typer.Option(
        "--tool-call-parser", help="As vllm serve: tool-call parser (pythonic, hermes, ...)."
    ),
]
AutoToolChoice = Annotated[
    bool,
    typer.Option(
        "--enable-auto-tool-choice/--no-enable-auto-tool-choice",
        help="As vllm serve: let the model call tools (needs a parser).",
    ),
]
StructuredBackend = Annotated[
    str | None,
    typer.Option(
        "--structured-outputs-backend",
        help="As vllm serve's structured-outputs backend: auto|xgrammar|guidance|...",
    ),
]
Ray = Annotated[
    bool, typer.Option("--ray", help="Serve with Ray Serve: replicas, adapter affinity.")
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="With --ray: join this Ray cluster (else RAY_ADDRESS, else a local Ray)."),
]
Replicas = Annotated[
    int | None,
    typer.Option("--replicas", min=1, help="With --ray: engine replicas, a fixed count [2]."),
]
MinReplicas = Annotated[
    int | None,
    typer.Option("--min-replicas", min=0, help="With --ray --max-replicas: autoscaling floor [1]."),
]
MaxReplicas = Annotated[
    int | None,
    typer.Option("--max-replicas", min=1, help="With --ray: autoscale replicas up to this many."),
]
TargetOngoing = Annotated[
    float | None,
    typer.Option(
        "--target-ongoing-requests", help="With --max-replicas: requests per replica aimed for."
    ),
]
PerNode = Annotated[
    int | None,
    typer.Option(
        "--max-replicas-per-node", min=1, help="With --ray: at most this many replicas per node."
    ),
]
PerReplica = Annotated[
    int | None,
    typer.Option(
        "--adapters-per-replica",
        min=1,
        help="With --ray: adapter versions one replica keeps loaded.",
    ),
]


def serve(
    ctx: typer.Context,
    demo: Annotated[bool, typer.Option(help="Serve the demo model and adapters.")] = False,
    quantized: Annotated[bool, typer.Option(help="With --demo: the quantized base.")] = False,
    model: Model = None,
    adapters_dir: AdaptersDir = None,
    served_model_name: ServedName = None,
    host: Host = None,
    port: Port = None,
    engine_dtype: Dtype = None,
    engine_max_lora_rank: MaxLoraRank = None,
    engine_max_loras: MaxLoras = None,
    engine_max_model_len: MaxModelLen = None,
    unsafe_allow_open_network: OpenNetwork = False,
    engine_kv_cache_gib: KvCacheGib = None,
    openai_chat_template: ChatTemplate = None,
    openai_tool_call_parser: ToolCallParser = None,
    openai_enable_auto_tool_choice: AutoToolChoice = False,
    openai_structured_outputs_backend: StructuredBackend = None,
    ray: Ray = False,
    ray_address: RayAddress = None,
    ray_replicas: Replicas = None,
    ray_min_replicas: MinReplicas = None,
    ray_max_replicas: MaxReplicas = None,
    ray_target_ongoing_requests: TargetOngoing = None,
    ray_max_replicas_per_node: PerNode = None,
    ray_adapters_per_replica: PerReplica = None,
    home: HomeOpt = None,
) -> None:
    """Run the OpenAI-compatible server (one process, or Ray Serve replicas with --ray)."""
    # Each settings flag is named as its field (`engine_x` is field x of `engine`): the
    # parameters are the settings, with no table between them to keep in step.
    flags = {k: v for k, v in ctx.params.items() if k not in ("demo", "quantized", "ray")}
    _run(_settings(**flags), demo=demo, quantized=quantized, ray=ray)


def _run(settings: Settings, *, demo: bool, quantized: bool, ray: bool) -> None:
    if quantized and not demo:
        raise typer.BadParameter("--quantized selects the demo's quantized base; use with --demo")
    if demo:
        assets = _prepare_demo(settings.home)
        settings = settings.model_copy(
            update={
                "model": assets.quantized_dir if quantized else assets.base_dir,
                "adapters_dir": settings.adapters_dir or assets.adapters_dir,
                "openai": _demo_openai(settings.openai),
            }
        )
    if settings.model is None:
        raise typer.BadParameter("give --model (or --demo)")
    _configure_logging()
    if ray:
        from server.scaleout.ray_serve import serve_forever

        serve_forever(settings)
        return
    console.print(
        f"serving {settings.served_model_name} from {settings.model} on "
        f"http://{settings.host}:{settings.port}"
    )
    _serve_uvicorn(settings)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The request log is JSON already: one bare line per request, for log shippers.
    requests_log = logging.getLogger("loraswap.requests")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests_log.addHandler(handler)
    requests_log.propagate = False


def _serve_uvicorn(settings: Settings) -> None:
    from server.app import create_app

    app_ = create_app(settings)
    config = uvicorn.Config(
        app_,
        host=settings.host,
        port=settings.port,
        log_level="info",
        limit_concurrency=settings.limit_concurrency,
        # The peer address must be the TCP peer: open mode decides "local" from it
        # (server/auth.py), and uvicorn would otherwise take it from X-Forwarded-For.
        proxy_headers=False,
    )
    DrainingServer(config, app_.state.lifecycle, settings.drain_timeout_s).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains: new requests get 503, running ones finish (bounded by
    `drain_timeout_s`), then the process shuts down and exits 0.

    uvicorn's own SIGTERM handling stops at once and re-raises the signal afterwards
    (exit status -15); orchestrators that send SIGTERM expect a drain and a clean exit.
    A second SIGTERM, or SIGINT, falls back to uvicorn's behaviour.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float):
        super().__init__(config)
        self._lifecycle = lifecycle
        self._drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # Signal handlers run in the main thread, which is the event loop's.
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        start = time.perf_counter()
        console.print("SIGTERM: draining (new requests get 503)")
        finished = await self._lifecycle.drain(self._drain_timeout_s)
        console.print(
            f"drain {'complete' if finished else 'timed out'} after "
            f"{time.perf_counter() - start:.2f}s; shutting down"
        )
        self.should_exit = True
