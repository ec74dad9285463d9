"""What the registry persists: adapters, their immutable versions, and aliases."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from adapters_registry.digest import content_digest


@dataclass(frozen=True)
class ServingDefaults:
    """What a version's requests get for the fields they do not send: the behaviour a
    customer bought with the adapter, rolled back with it. None = no default.

    server/serving.py validates them (vLLM's own request model and bounds, our caps) and
    applies them; the registry only keeps them.
    """

    system_prompt: str | None = None  # a system message when the conversation has none
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | tuple[str, ...] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    chat_template: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, Any]:
        """The defaults that are set, JSON-ready, in declaration order."""
        out: dict[str, Any] = {}
        for name in self.names():
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServingDefaults:
        """From `as_dict`'s output (as stored: already validated)."""
        stop = data.get("stop")
        return cls(**{**data, "stop": tuple(stop) if isinstance(stop, list) else stop})


@dataclass(frozen=True)
class VersionRecord:
    adapter: str
    version: int
    sha256: str
    size_bytes: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    source: str  # where it came from: a path, a URL, or "upload"
    path: str  # where its files are on this machine
    created_at: float
    # Digest of the config fields that change the math (validate.config_digest); None
    # for versions registered before configs were pinned.
    config_sha256: str | None = None
    # What its requests get for the fields they do not send (None: nothing).
    defaults: ServingDefaults | None = None

    @property
    def content_digest(self) -> str:
        """Identity of what this version serves, weights and config together: the key of
        its files in the registry's storage and of its residency in every cache."""
        return content_digest(self.sha256, self.config_sha256)


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    current_version: int | None
    pinned: bool
    created_at: float
    versions: tuple[VersionRecord, ...] = field(default=())
    owner: str | None = None  # a tenant; None = the operator's
    shared: bool = False  # usable by every tenant
    # Registered by folder discovery, so it follows its folder of the adapters directory;
    # None: registered before this was recorded (the router infers it from the path).
    discovered: bool | None = False

    def version(self, number: int) -> VersionRecord | None:
        return next((v for v in self.versions if v.version == number), None)

    @property
    def current(self) -> VersionRecord | None:
        return None if self.current_version is None else self.version(self.current_version)


@dataclass(frozen=True)
class Variant:
    """One arm of an alias: an adapter, optionally pinned to a version, and its weight."""

    adapter: str
    version: int | None
    weight: int

    @property
    def key(self) -> str:
        return self.adapter if self.version is None else f"{self.adapter}@{self.version}"


@dataclass(frozen=True)
class AliasRecord:
    name: str
    variants: tuple[Variant, ...]
    created_at: float
    updated_at: float
    owner: str | None = None
    shared: bool = False


@dataclass(frozen=True)
class TenantRecord:
    name: str
    max_concurrent: int | None  # None = no limit
    tokens_per_minute: int | None  # prompt + completion tokens; None = no limit
    created_at: float
    key_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyRecord:
    key_id: str  # public part of the key, safe to log and list
    tenant: str
    secret_sha256: str  # the secret itself is never stored
    created_at: float
