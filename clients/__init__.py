"""Python clients of the loraswap server: `Client` (blocking) and `AsyncClient` (asyncio).

    from clients import Client

    with Client("http://127.0.0.1:8000", admin_key="...") as admin:
        admin.put_tenant("acme", max_concurrent=4)
        key = admin.create_key("acme")["key"]  # shown once: store it
        admin.register_adapter("support", "/srv/adapters/support-v1", owner="acme")

    with Client("http://127.0.0.1:8000", api_key=key) as client:
        reply = client.chat("smollm2:support", [{"role": "user", "content": "hi"}])
        print(reply.text, reply.served_by.adapter_version)

Only httpx and the standard library: the server's code is never imported.
"""

from clients._api import DEFAULT_TIMEOUT, DEFAULT_URL, Endpoints
from clients._retry import RetryPolicy, parse_retry_after
from clients._streams import AsyncStream, Stream
from clients._wire import AdapterFiles
from clients.async_client import AsyncClient
from clients.client import Client
from clients.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    LoraswapError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from clients.types import (
    JSON,
    AdapterInfo,
    AliasInfo,
    Completion,
    DeletedAdapter,
    DeletedKey,
    DeletedTenant,
    ExposureInfo,
    FeedbackInfo,
    ModelInfo,
    NewApiKey,
    ProgressCallback,
    ServedBy,
    ServingDefaults,
    TenantInfo,
    VersionInfo,
    VersionState,
    WarmedAdapter,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "JSON",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterFiles",
    "AdapterInfo",
    "AliasInfo",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "ConflictError",
    "DeletedAdapter",
    "DeletedKey",
    "DeletedTenant",
    "Endpoints",
    "ExposureInfo",
    "FeedbackInfo",
    "InternalServerError",
    "LoraswapError",
    "ModelInfo",
    "NewApiKey",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProgressCallback",
    "RateLimitError",
    "RetryPolicy",
    "ServedBy",
    "ServiceUnavailableError",
    "ServingDefaults",
    "Stream",
    "TenantInfo",
    "UnprocessableEntityError",
    "VersionInfo",
    "VersionState",
    "WarmedAdapter",
    "parse_retry_after",
]
