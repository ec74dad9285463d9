"""What the Ray ingress (server/scaleout/ray_serve.py) does with a request, without Ray: admission
at the edge, then the call to a replica. Kept apart so that it is unit-tested with the
fake engine and a replica called in-process.

In order, before any replica is called:

1. **Body limits**, as the single-process server applies them (server/lifecycle.py):
   `max_body_bytes`, and the upload limit only on the two upload routes once the admin
   key checked out (an upload without it is refused before its body is read). The body
   is counted while it is read and refused as soon as it passes the limit. (It is held
   in memory up to that limit: it crosses to the replica as one object.)
2. **Authentication** of inference requests (server/auth.py: key -> principal, open mode
   for local callers): a 401 here does not depend on the model named, so it says nothing
   about which names exist, and nothing is routed or loaded for it.
3. **Tenant access**: an adapter or alias the caller may not use gets no routing key, so
   no replica loads it for the request; the replica answers the 404 that an absent name
   gets.
4. **Routing** (placement.py: routing_key) and the replica call. Its
   `x-loraswap-*` headers (replica, cold load) are passed on only on success.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters_registry.registry import Registry
from adapters_registry.tenants import usable_by
from server.app import open_mode
from server.auth import bearer, local_caller, principal_for
from server.errors import EngineUnavailable, ModelNotFound, ServerError, describe
from server.lifecycle import body_limit, too_large, upload_limit
from server.names import parse_model
from server.scaleout.placement import INFERENCE_PATHS, HttpRequest, ResponseStart, routing_key
from server.settings import Settings

log = logging.getLogger("loraswap.ray")

ReplicaCall = Callable[[HttpRequest, str | None], AsyncIterator[ResponseStart | bytes]]
"""(request, routing key or None) -> the replica's response start, then its body chunks."""

# Not passed on from the replica: hop-by-hop, and x-request-id (Ray's proxy adds the same).
_DROPPED = {b"content-length", b"transfer-encoding", b"connection", b"x-request-id"}
_OURS = b"x-loraswap-"


class Gate:
    """The ingress's decisions on one request: limits, caller, access, routing key."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.registry = registry
        self.base = settings.served_model_name
        self.admin_key = (
            settings.admin_key.get_secret_value() if settings.admin_key is not None else None
        )
        self.open_mode = open_mode(settings)
        self.max_body_bytes = settings.max_body_bytes
        self.max_upload_bytes = upload_limit(settings.max_adapter_bytes)

    def routing(self, request: HttpRequest) -> str | None:
        """The routing key of an admitted request (None: any replica); raises the
        ServerError to answer instead (401) for an inference call without valid
        credentials, whatever model it names."""
        if request.method != "POST" or request.path not in INFERENCE_PATHS:
            return None
        principal = principal_for(
            bearer(request.headers),
            admin_key=self.admin_key,
            registry=self.registry,
            open_mode=self.open_mode,
            local=local_caller(request.client, request.headers),
        )
        if not self._usable(request.body, principal.tenant_name):
            return None  # the replica answers 404 as for an absent name; nothing loads
        user = _header(request.headers, b"x-user-id")
        return routing_key(self.registry, self.base, request.body, user)

    def _usable(self, body: bytes, tenant: str | None) -> bool:
        """Whether the adapter or alias named in `body` may be used by `tenant` (True when
        it names none the registry knows: then there is nothing to route to anyway)."""
        try:
            payload: Any = json.loads(body)
        except ValueError:
            return True
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            return True
        try:
            name = parse_model(model, self.base)
        except ModelNotFound:
            return True
        if name is None:
            return True
        record = self.registry.alias(name) or self.registry.adapter(name)
        return record is None or usable_by(record, tenant)


async def forward(gate: Gate, request: Request, call: ReplicaCall) -> Response:
    """Admit `request` at the edge, then stream the replica's answer back."""
    admitted = await admit(gate, request)
    if isinstance(admitted, Response):
        return admitted
    try:
        key = gate.routing(admitted)
    except ServerError as exc:
        return error_response(exc)
    stream = call(admitted, key)
    try:
        start = await stream.__anext__()
    except Exception as exc:
        log.warning("replica call failed: %r", exc)
        return error_response(EngineUnavailable("no replica could serve the request; retry"))
    assert isinstance(start, ResponseStart)
    response = StreamingResponse(_relay(stream, _is_sse(start)), status_code=start.status)
    response.raw_headers = reply_headers(start)
    return response


async def admit(gate: Gate, request: Request) -> HttpRequest | Response:
    """The request as it crosses to a replica, its body read within the limits; or the
    refusal to answer instead (413, or 401 for an upload without the admin key)."""
    headers = list(request.headers.raw)
    path = request.url.path
    limit, refused = body_limit(
        request.method,
        path,
        headers,
        admin_key=gate.admin_key,
        max_body_bytes=gate.max_body_bytes,
        max_upload_bytes=gate.max_upload_bytes,
    )
    if refused is not None:
        return error_response(refused)
    body = await read_body(request, limit)
    if body is None:
        return error_response(too_large(limit, None))
    client = request.client
    return HttpRequest(
        method=request.method,
        path=path,
        query_string=request.url.query.encode(),
        headers=headers,
        body=body,
        client=(client.host, client.port) if client else None,
    )


async def _relay(stream: AsyncIterator[ResponseStart | bytes], sse: bool) -> AsyncIterator[bytes]:
    """The rest of the replica's response, after its start."""
    try:
        async for chunk in stream:
            assert isinstance(chunk, bytes)
            yield chunk
    except Exception as exc:
        # The replica died mid-response (its process killed, its node gone). A
        # stream ends as a stream that failed does; other bodies can only be cut.
        log.warning("replica failed mid-response: %r", exc)
        if not sse:
            raise
        yield error_frame(EngineUnavailable("the replica serving this stream failed; retry"))
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _is_sse(start: ResponseStart) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream")
        for k, v in start.headers
    )


def reply_headers(start: ResponseStart) -> list[tuple[bytes, bytes]]:
    """The replica's headers as the client gets them: our own `x-loraswap-*` ones only
    on success (an error says nothing about replicas or loads)."""
    return [
        (k, v)
        for k, v in start.headers
        if k not in _DROPPED and (start.status < 400 or not k.startswith(_OURS))
    ]


def error_frame(exc: Exception) -> bytes:
    """An SSE error frame, then the end of the stream, as the app ends a failed stream."""
    _, body = describe(exc)
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


def error_response(exc: Exception) -> JSONResponse:
    """An error answered by the ingress itself: the same status and body as the app's."""
    kind, body = describe(exc)
    return JSONResponse(body, status_code=kind.status)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, counted as it arrives; None as soon as it passes `limit` (the rest is
    not read)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1") or None
    return None
