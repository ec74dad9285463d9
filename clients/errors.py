"""Every error the loraswap clients raise, in one tree.

    LoraswapError                      anything this package raises about a call
    ├── APIConnectionError             no (complete) answer: refused, reset, stream cut short
    │   └── APITimeoutError            the answer did not come in time
    └── APIStatusError                 the server answered with an error (any status)
        ├── BadRequestError            400  invalid parameter, malformed JSON, bad source
        ├── AuthenticationError        401  no API key where one is required, or an invalid one
        ├── PermissionDeniedError      403  wrong admin key, admin API disabled, path outside roots
        ├── NotFoundError              404  no such model, adapter, version, alias or tenant
        │                                   (another tenant's private adapter looks the same)
        ├── ConflictError              409  name taken, still in use, source changed
        ├── PayloadTooLargeError       413  adapter above the server's size cap
        ├── UnprocessableEntityError   422  unsafe, malformed or incompatible adapter, bad alias
        ├── RateLimitError             429  a tenant quota: requests at once, or tokens per minute
        └── InternalServerError        5xx  the server (or a gateway) failed
            └── ServiceUnavailableError 503 the engine is not running, or the server is full

The server answers errors in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`; every field of it is on the exception, with the HTTP status, the request id
and `retry_after`, the server's `Retry-After` in seconds (429 and 503 send one). The class
says the status; `code` says the exact problem (`already_exists`, `checksum_mismatch`,
...), as listed in the README's errors table.

An error that arrives inside a stream (an SSE error frame, after the 200 status line)
raises the same classes: its `status` is the one the server gives that error elsewhere,
inferred from `type` and `code`, because the real status line said 200.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


class LoraswapError(Exception):
    """Base of every error raised by a client call.

    `status`, `type`, `param` and `code` are None when the server never answered.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message if self.code is None else f"{self.message} ({self.code})"


class APIConnectionError(LoraswapError):
    """The server could not be reached, or the connection broke before the answer ended."""


class APITimeoutError(APIConnectionError):
    """Connecting, sending or reading took longer than the client's timeout."""


class APIStatusError(LoraswapError):
    """The server answered with an error status; the base of the per-status classes.

    `retry_after`: seconds the server asked to wait before trying again (its `Retry-After`
    header), or None. The clients already waited that long between their own retries; it
    is what remains for you when they gave up (retries used up, or a wait above
    `RetryPolicy.max_retry_after`).
    """

    status: int

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message, status=status, type=type, param=param, code=code, request_id=request_id
        )
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """400: an invalid parameter, malformed JSON, a source that cannot be fetched."""


class AuthenticationError(APIStatusError):
    """401: no `Authorization: Bearer` where the server requires one (`missing_api_key`),
    or a tenant API key it does not know (`invalid_api_key`)."""


class PermissionDeniedError(APIStatusError):
    """403: a wrong admin key, the admin API disabled, or a source path outside the roots."""


class NotFoundError(APIStatusError):
    """404: no such base, adapter, version, alias or tenant. An adapter or alias of another
    tenant answers exactly like one that does not exist."""


class ConflictError(APIStatusError):
    """409: the name is taken, still routed or current, or the files changed on disk."""


class PayloadTooLargeError(APIStatusError):
    """413: the adapter's weights are above the server's `max_adapter_bytes`."""


class UnprocessableEntityError(APIStatusError):
    """422: the adapter or alias is well-formed JSON but cannot be accepted as it is."""


class RateLimitError(APIStatusError):
    """429: a tenant's quota is used up: `max_concurrent` requests already running, or its
    `tokens_per_minute`. Retried after `Retry-After` before it reaches you; `retry_after`
    says how long to wait before the next try."""


class InternalServerError(APIStatusError):
    """5xx: the server or a gateway failed."""


class ServiceUnavailableError(InternalServerError):
    """503: the inference engine is not running (starting, draining or dead:
    `engine_unavailable`), the server has as many requests in flight as it takes
    (`server_overloaded`), its download cache holds only adapters in use
    (`adapter_cache_full`), or (Ray) the application's quota state is unreachable
    (`quotas_unavailable`); `retry_after` says when to try again."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# Only for errors inside a stream, which carry no status: the status the server answers
# each of them with elsewhere (server/errors.py's table, as documented in the README).
# A copy, since this package imports httpx only: tests/unit/test_error_tables.py checks it
# against the server's table, both ways.
_STATUS_BY_CODE = {
    "context_length_exceeded": 400,
    "invalid_defaults": 400,
    "invalid_source": 400,
    # invalid_api_key is not here: 401 for a tenant key, 403 for an admin key; `type` tells.
    "missing_api_key": 401,
    "admin_disabled": 403,
    "permission_denied": 403,
    "path_outside_roots": 403,
    "model_not_found": 404,
    "tenant_not_found": 404,
    "response_not_found": 404,
    "already_exists": 409,
    "in_use": 409,
    "source_changed": 409,
    "conflict": 409,
    "adapter_too_large": 413,
    "request_too_large": 413,
    "adapter_invalid": 422,
    "adapter_unsafe_format": 422,
    "adapter_malformed": 422,
    "checksum_mismatch": 422,
    "invalid_sha256": 422,
    "adapter_unsupported": 422,
    "adapter_rank_too_large": 422,
    "adapter_incompatible": 422,
    "invalid_adapter_name": 422,
    "invalid_alias": 422,
    "rate_limit_exceeded": 429,
    "engine_error": 500,
    "not_implemented": 501,
    "engine_unavailable": 503,
    "server_overloaded": 503,
    "adapter_cache_full": 503,
    "registry_unavailable": 503,
    "quotas_unavailable": 503,
    "insufficient_storage": 507,
}
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "rate_limit_error": 429,
    "service_unavailable_error": 503,
}


def error_class(status: int) -> type[APIStatusError]:
    """The exception class for an HTTP error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIStatusError


def status_error(
    status: int,
    body: object,
    *,
    request_id: str | None = None,
    reason: str = "",
    retry_after: float | None = None,
) -> APIStatusError:
    """The typed error for an error answer: `body` is the decoded JSON (or None),
    `retry_after` its `Retry-After` in seconds.

    Bodies that are not OpenAI-shaped (a gateway's page, a framework's `{"detail": ...}`)
    still give the right class; their text, or the reason phrase, becomes the message.
    """
    fields: Mapping[str, Any] = {}
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            fields = inner
        elif isinstance(body.get("detail"), str):
            fields = {"message": body["detail"]}
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = f"HTTP {status} {reason}".strip()
    return error_class(status)(
        message,
        status=status,
        type=_str_or_none(fields.get("type")),
        param=_str_or_none(fields.get("param")),
        code=_str_or_none(fields.get("code")),
        request_id=request_id,
        retry_after=retry_after,
    )


def stream_error(error: Mapping[str, Any], *, request_id: str | None = None) -> APIStatusError:
    """The typed error for an SSE error frame's `{"error": {...}}` (no status of its own)."""
    code, type_ = _str_or_none(error.get("code")), _str_or_none(error.get("type"))
    status = _STATUS_BY_CODE.get(code or "") or _STATUS_BY_TYPE.get(type_ or "", 500)
    return status_error(status, {"error": error}, request_id=request_id)


def connection_error(exc: httpx.TransportError, request_id: str | None = None) -> LoraswapError:
    """The typed error for a transport failure (the original stays as `__cause__`)."""
    url = exc.request.url if _has_request(exc) else "the server"
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    verb = "timed out talking to" if cls is APITimeoutError else "cannot talk to"
    return cls(f"{verb} {url} ({what})", request_id=request_id)


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when httpx never attached one
    except RuntimeError:
        return False
    return True


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
