"""Every error the registry raises, in one tree.

    AdapterError
    ├── AdapterNotFound          no adapter (or version) by that name
    ├── InvalidAdapterName       the name does not match the allowed pattern
    ├── PathOutsideRoots         a path resolves outside the configured roots
    └── InvalidAdapter           the files exist but cannot be served as-is
        ├── UnsafeFormat         pickle / non-safetensors weights
        ├── MalformedAdapter     unreadable config, truncated or corrupt safetensors
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


class AdapterNotFound(AdapterError):
    pass


class InvalidAdapterName(AdapterError):
    pass


class PathOutsideRoots(AdapterError):
    pass


class InvalidAdapter(AdapterError):
    pass


class UnsafeFormat(InvalidAdapter):
    pass


class MalformedAdapter(InvalidAdapter):
    pass


class UnsupportedAdapter(InvalidAdapter):
    pass


class RankTooLarge(InvalidAdapter):
    pass


class IncompatibleAdapter(InvalidAdapter):
    pass


class AdapterTooLarge(InvalidAdapter):
    pass
