"""What the calls return: the server's JSON as typed dicts, and who served a request.

The TypedDicts are the server's response bodies as they are on the wire (plain dicts at
run time, nothing is copied or validated); the tests check each one's keys against the
real app, so a server change that drops or renames a field fails there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

JSON = dict[str, Any]
"""A decoded JSON object: completion bodies and stream chunks stay plain dicts (OpenAI's
shapes, documented by OpenAI; the official SDK's types fit them if you want more)."""

ProgressCallback = Callable[[int, int], None]
"""`progress(sent_bytes, total_bytes)`, called as an upload's files are read. On a retry
the count starts again from zero."""


class ServingDefaults(TypedDict, total=False):
    """A version's serving defaults: what its requests get for the fields they do not
    send (a system prompt when the conversation has none, sampling settings)."""

    system_prompt: str
    temperature: float
    top_p: float
    max_tokens: int
    stop: str | list[str]
    presence_penalty: float
    frequency_penalty: float
    chat_template: str


class VersionInfo(TypedDict):
    """One immutable version of an adapter."""

    adapter: str
    version: int
    sha256: str
    size_bytes: int
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str
    source: str  # the path or URL it was registered from, or "upload"
    created_at: float  # Unix time
    defaults: ServingDefaults | None  # None: none


class VersionState(VersionInfo):
    """A version as listed under its adapter, with its engine residency."""

    loaded: bool  # in the engine now
    running: int  # requests running on it now


class AdapterInfo(TypedDict):
    """An adapter, its versions and which one new requests get."""

    name: str
    current_version: int | None
    pinned: bool
    owner: str | None  # the tenant that owns it; None: the operator's
    shared: bool  # usable by every tenant (else by its owner only; the operator uses all)
    created_at: float
    versions: list[VersionState]


class AliasInfo(TypedDict):
    """An A/B alias: variant (`name` or `name@N`) -> integer weight."""

    name: str
    variants: dict[str, int]
    owner: str | None
    shared: bool
    created_at: float
    updated_at: float


class FeedbackInfo(TypedDict):
    """An outcome recorded for one response (A/B experiments); the last one sent per
    (response, metric) is the one kept."""

    object: str  # "feedback"
    response_id: str
    request_id: str
    alias: str
    variant: str  # the arm that served the response, e.g. "pirate@3"
    metric: str
    label: int | None  # 1 positive, 0 negative
    score: float | None
    created_at: float
    updated_at: float


class ExposureInfo(TypedDict):
    """Which alias arm served one response, and how it went."""

    object: str  # "exposure"
    response_id: str
    request_id: str
    alias: str
    variant: str
    adapter: str
    version: int
    content_digest: str
    tenant: str | None
    user_hash: str | None  # sha256 of the request's user; the user itself is not kept
    created_at: float
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float


class TenantInfo(TypedDict):
    """A tenant: its quotas (None: no limit), its API keys' ids, its requests running."""

    name: str
    max_concurrent: int | None  # requests running at once
    tokens_per_minute: int | None  # prompt + completion tokens
    created_at: float
    key_ids: list[str]  # the public part of each key; the keys themselves are not kept
    running: int


class NewApiKey(TypedDict):
    """A tenant's new API key. `key` is in this answer only: the server keeps its hash."""

    tenant: str
    key_id: str
    key: str  # "lsk_<key_id>_<secret>": send it as `Client(api_key=...)`
    created_at: float


class DeletedTenant(TypedDict):
    name: str
    deleted: bool


class DeletedKey(TypedDict):
    tenant: str
    key_id: str
    deleted: bool


class DeletedAdapter(TypedDict):
    name: str
    deleted: bool


class WarmedAdapter(TypedDict):
    name: str
    loaded: str  # the engine's name for what was loaded: "<adapter>@<version>"


class _ModelKind(TypedDict, total=False):
    kind: str  # "alias" for aliases; absent for the base and adapters
    max_model_len: int  # context length (vLLM's model card)
    permission: list[dict[str, object]]  # vLLM's model card; empty here


class ModelInfo(_ModelKind):
    """One entry of `/v1/models`: the base, `<base>:<adapter>` or `<base>:<alias>`."""

    id: str
    object: str
    created: int
    owned_by: str
    root: str
    parent: str | None


@dataclass(frozen=True)
class ServedBy:
    """What served an inference request, from the response headers.

    `adapter`/`adapter_version` are None for the base model; `alias`/`alias_variant` are
    set when the request named an alias (`alias_variant` is `name` or `name@N`);
    `defaults_applied` names the version's serving defaults the request was given.
    """

    request_id: str | None = None
    adapter: str | None = None
    adapter_version: int | None = None
    alias: str | None = None
    alias_variant: str | None = None
    defaults_applied: tuple[str, ...] = ()

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ServedBy:
        """Read the `x-request-id`, `x-adapter(-version)`, `x-alias(-variant)` and
        `x-adapter-defaults` headers."""
        version = headers.get("x-adapter-version")
        defaults = headers.get("x-adapter-defaults")
        return cls(
            request_id=headers.get("x-request-id"),
            adapter=headers.get("x-adapter"),
            adapter_version=int(version) if version and version.isdigit() else None,
            alias=headers.get("x-alias"),
            alias_variant=headers.get("x-alias-variant"),
            defaults_applied=tuple(defaults.split(",")) if defaults else (),
        )


@dataclass(frozen=True)
class Completion:
    """A chat or text completion: the OpenAI-shaped `body` and what served it."""

    body: JSON
    served_by: ServedBy

    @property
    def text(self) -> str:
        """The first choice's text (chat: the message content)."""
        choice = self.body["choices"][0]
        if "message" in choice:
            return str(choice["message"].get("content") or "")
        return str(choice.get("text") or "")
