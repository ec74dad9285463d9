"""Every error the registry raises, in one tree.

    AdapterError
    ├── AdapterNotFound          no adapter (or version) by that name
    │   └── TenantNotFound       no tenant (or key) by that name
    ├── InvalidAdapterName       the name does not match the allowed pattern
    ├── PathOutsideRoots         a path resolves outside the configured roots
    ├── Conflict                 the change contradicts the registry's state
    │   ├── AlreadyExists        the name is taken (by an adapter or an alias)
    │   ├── InUse                an alias (or the current pointer) still routes to it
    │   └── SourceChanged        files on disk no longer match the registered sha256
    ├── InvalidSource            a source we cannot fetch (bad URL, scheme, download error)
    ├── InvalidChecksum          an expected sha256 that is not 64 hex digits
    ├── CacheFull                the download cache holds only adapters in use (transient)
    ├── RegistryUnavailable      the registry database cannot be reached (transient)
    ├── InsufficientStorage      no disk space left for adapter files (the server's disk)
    ├── InvalidAlias             weights or variants of an alias are not valid
    └── InvalidAdapter           the files exist but cannot be served as-is
        ├── UnsafeFormat         pickle / non-safetensors weights
        ├── MalformedAdapter     unreadable config, truncated or corrupt safetensors
        │   └── ChecksumMismatch the weights' sha256 is not the one given
        ├── UnsupportedAdapter   valid PEFT, but a feature we cannot serve (DoRA, ...)
        ├── RankTooLarge         rank above the engine's maximum
        ├── IncompatibleAdapter  tensor shapes do not fit the base model
        └── AdapterTooLarge      weights above the size cap

The HTTP layer maps each class to one status (server/errors.py); nothing here
knows about HTTP. Messages name the exact problem, because they reach the user.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every registry error."""

    def __init__(self, message: str, *, adapter: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.adapter = adapter
        # The request field at fault, when the caller knows it (e.g. "model").
        self.param: str | None = None


class AdapterNotFound(AdapterError):
    pass


class TenantNotFound(AdapterNotFound):
    pass


class InvalidAdapterName(AdapterError):
    pass


class PathOutsideRoots(AdapterError):
    pass


class Conflict(AdapterError):
    pass


class AlreadyExists(Conflict):
    pass


class InUse(Conflict):
    pass


class SourceChanged(Conflict):
    pass


class InvalidSource(AdapterError):
    pass


class InvalidChecksum(AdapterError):
    pass


class CacheFull(AdapterError):
    """No room in the download cache right now: every cached adapter is in use. Transient
    (room comes back as requests end); `retry_after` is a hint in seconds."""

    def __init__(
        self, message: str, *, adapter: str | None = None, retry_after: float = 1.0
    ) -> None:
        super().__init__(message, adapter=adapter)
        self.retry_after = retry_after


class RegistryUnavailable(AdapterError):
    """The registry database is unreachable (PostgreSQL down, restarting, failing over).
    Transient: reads keep being served from the in-memory snapshot; writes must wait."""

    def __init__(
        self, message: str, *, adapter: str | None = None, retry_after: float = 5.0
    ) -> None:
        super().__init__(message, adapter=adapter)
        self.retry_after = retry_after


class InsufficientStorage(AdapterError):
    """The disk holding the registry's files (uploads, download cache) is full (ENOSPC)
    or over quota (EDQUOT): the server's problem, not the request's."""


class InvalidAlias(AdapterError):
    pass


class InvalidAdapter(AdapterError):
    pass


class UnsafeFormat(InvalidAdapter):
    pass


class MalformedAdapter(InvalidAdapter):
    pass


class ChecksumMismatch(MalformedAdapter):
    pass


class UnsupportedAdapter(InvalidAdapter):
    pass


class RankTooLarge(InvalidAdapter):
    pass


class IncompatibleAdapter(InvalidAdapter):
    pass


class AdapterTooLarge(InvalidAdapter):
    pass
