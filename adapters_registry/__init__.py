"""Adapter registry: names, validation, discovery. No HTTP and no vLLM in here."""

from adapters_registry.base_model import BaseModelShapes
from adapters_registry.catalog import DirectoryCatalog
from adapters_registry.errors import (
    AdapterError,
    AdapterNotFound,
    AdapterTooLarge,
    AlreadyExists,
    CacheFull,
    ChecksumMismatch,
    Conflict,
    IncompatibleAdapter,
    InsufficientStorage,
    InUse,
    InvalidAdapter,
    InvalidAdapterName,
    InvalidAlias,
    InvalidChecksum,
    InvalidSource,
    MalformedAdapter,
    PathOutsideRoots,
    RankTooLarge,
    RegistryUnavailable,
    SourceChanged,
    UnsafeFormat,
    UnsupportedAdapter,
)
from adapters_registry.names import check_name
from adapters_registry.spec import AdapterSpec
from adapters_registry.validate import Limits, inspect_adapter

__all__ = [
    "AdapterError",
    "AdapterNotFound",
    "AdapterSpec",
    "AdapterTooLarge",
    "AlreadyExists",
    "BaseModelShapes",
    "CacheFull",
    "ChecksumMismatch",
    "Conflict",
    "DirectoryCatalog",
    "InUse",
    "IncompatibleAdapter",
    "InsufficientStorage",
    "InvalidAdapter",
    "InvalidAdapterName",
    "InvalidAlias",
    "InvalidChecksum",
    "InvalidSource",
    "Limits",
    "MalformedAdapter",
    "PathOutsideRoots",
    "RankTooLarge",
    "RegistryUnavailable",
    "SourceChanged",
    "UnsafeFormat",
    "UnsupportedAdapter",
    "check_name",
    "inspect_adapter",
]
