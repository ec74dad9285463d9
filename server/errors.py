"""Every error the server answers with, and the ONE table that maps them to HTTP.

    ServerError
    ├── InvalidRequest           400  a parameter is wrong (names the param)
    │   ├── ContextLengthExceeded 400 prompt + max_tokens do not fit the context
    │   └── InvalidDefaults       400 a version's serving defaults are not valid
    ├── Unauthorized             401  no credentials where they are required
    │   └── InvalidApiKey        401  an API key that is not valid
    ├── Forbidden                403  credentials given but not good for this
    │   ├── WrongAdminKey        403  an admin key that is not the configured one
    │   └── AdminDisabled        403  no admin key is configured
    ├── ModelNotFound            404  no base, adapter or alias by that name
    ├── ResponseNotFound         404  no response by that id (of this caller): feedback
    ├── RequestTooLarge          413  the request body is above the limit
    ├── RateLimited              429  a tenant quota (concurrency or tokens/minute)
    ├── Overloaded               503  the server-wide bound on work in flight
    ├── QuotasUnavailable        503  Ray: the application's shared quota state is unreachable
    ├── NotImplementedByEngine   501  vLLM's OpenAI layer does not support this here
    ├── EngineUnavailable        503  the engine is starting, draining or dead
    └── EngineFailure            500  the engine failed on a request (a bug)

vLLM's OpenAI layer answers with its own errors; server/engine/openai_layer.py turns
each into one of these classes by its status, so it goes through the same table.

Registry errors (adapters_registry.errors) are mapped in the same table, so an
adapter problem reaches the client with the status and message of its exact class
(e.g. CacheFull: 503 `adapter_cache_full`, with Retry-After, like the 503s above).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters_registry import errors as reg


class ServerError(Exception):
    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds, sent as Retry-After


class InvalidRequest(ServerError):
    pass


class ContextLengthExceeded(InvalidRequest):
    pass


class InvalidDefaults(InvalidRequest):
    pass


class Unauthorized(ServerError):
    pass


class InvalidApiKey(Unauthorized):
    pass


class Forbidden(ServerError):
    pass


class WrongAdminKey(Forbidden):
    pass


class AdminDisabled(Forbidden):
    pass


class ModelNotFound(ServerError):
    pass


class ResponseNotFound(ServerError):
    pass


class RequestTooLarge(ServerError):
    pass


class RateLimited(ServerError):
    pass


class Overloaded(ServerError):
    pass


class QuotasUnavailable(ServerError):
    pass


class NotImplementedByEngine(ServerError):
    pass


class EngineUnavailable(ServerError):
    pass


class EngineFailure(ServerError):
    pass


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None


_INVALID = "invalid_request_error"

# Most specific class first: lookup walks the exception's MRO.
ERROR_TABLE: dict[type[Exception], ErrorKind] = {
    ContextLengthExceeded: ErrorKind(400, _INVALID, "context_length_exceeded"),
    InvalidDefaults: ErrorKind(400, _INVALID, "invalid_defaults"),
    InvalidRequest: ErrorKind(400, _INVALID, None),
    Unauthorized: ErrorKind(401, "authentication_error", "missing_api_key"),
    AdminDisabled: ErrorKind(403, "permission_error", "admin_disabled"),
    WrongAdminKey: ErrorKind(403, "permission_error", "invalid_api_key"),
    InvalidApiKey: ErrorKind(401, "authentication_error", "invalid_api_key"),
    Forbidden: ErrorKind(403, "permission_error", "permission_denied"),
    ModelNotFound: ErrorKind(404, _INVALID, "model_not_found"),
    ResponseNotFound: ErrorKind(404, _INVALID, "response_not_found"),
    RequestTooLarge: ErrorKind(413, _INVALID, "request_too_large"),
    RateLimited: ErrorKind(429, "rate_limit_error", "rate_limit_exceeded"),
    Overloaded: ErrorKind(503, "service_unavailable_error", "server_overloaded"),
    QuotasUnavailable: ErrorKind(503, "service_unavailable_error", "quotas_unavailable"),
    NotImplementedByEngine: ErrorKind(501, _INVALID, "not_implemented"),
    EngineUnavailable: ErrorKind(503, "service_unavailable_error", "engine_unavailable"),
    EngineFailure: ErrorKind(500, "server_error", "engine_error"),
    ServerError: ErrorKind(500, "server_error", None),
    reg.AdapterNotFound: ErrorKind(404, _INVALID, "model_not_found"),
    reg.TenantNotFound: ErrorKind(404, _INVALID, "tenant_not_found"),
    reg.AlreadyExists: ErrorKind(409, _INVALID, "already_exists"),
    reg.InUse: ErrorKind(409, _INVALID, "in_use"),
    reg.SourceChanged: ErrorKind(409, _INVALID, "source_changed"),
    reg.Conflict: ErrorKind(409, _INVALID, "conflict"),
    reg.InvalidSource: ErrorKind(400, _INVALID, "invalid_source"),
    reg.InvalidChecksum: ErrorKind(422, _INVALID, "invalid_sha256"),
    reg.CacheFull: ErrorKind(503, "service_unavailable_error", "adapter_cache_full"),
    reg.RegistryUnavailable: ErrorKind(503, "service_unavailable_error", "registry_unavailable"),
    reg.InsufficientStorage: ErrorKind(507, "server_error", "insufficient_storage"),
    reg.InvalidAlias: ErrorKind(422, _INVALID, "invalid_alias"),
    reg.ChecksumMismatch: ErrorKind(422, _INVALID, "checksum_mismatch"),
    reg.InvalidAdapterName: ErrorKind(422, _INVALID, "invalid_adapter_name"),
    reg.PathOutsideRoots: ErrorKind(403, "permission_error", "path_outside_roots"),
    reg.UnsafeFormat: ErrorKind(422, _INVALID, "adapter_unsafe_format"),
    reg.MalformedAdapter: ErrorKind(422, _INVALID, "adapter_malformed"),
    reg.UnsupportedAdapter: ErrorKind(422, _INVALID, "adapter_unsupported"),
    reg.RankTooLarge: ErrorKind(422, _INVALID, "adapter_rank_too_large"),
    reg.IncompatibleAdapter: ErrorKind(422, _INVALID, "adapter_incompatible"),
    reg.AdapterTooLarge: ErrorKind(413, _INVALID, "adapter_too_large"),
    reg.InvalidAdapter: ErrorKind(422, _INVALID, "adapter_invalid"),
    reg.AdapterError: ErrorKind(400, _INVALID, None),
}


def classify(exc: Exception) -> ErrorKind:
    for cls in type(exc).__mro__:
        kind = ERROR_TABLE.get(cls)
        if kind is not None:
            return kind
    return ErrorKind(500, "server_error", None)


def error_body(message: str, kind: ErrorKind, param: str | None = None) -> dict[str, object]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def describe(exc: Exception) -> tuple[ErrorKind, dict[str, object]]:
    """The status/type and the JSON body for any exception we may raise."""
    kind = classify(exc)
    if isinstance(exc, ServerError):
        return kind, error_body(exc.message, kind, exc.param)
    if isinstance(exc, reg.AdapterError):
        return kind, error_body(exc.message, kind, exc.param)
    # Unknown exceptions are bugs: never leak their text to clients.
    return kind, error_body("internal server error", kind)
