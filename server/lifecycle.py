"""Request admission at the ASGI level: body size limits, in-flight counting, draining.

A pure ASGI middleware rather than FastAPI's decorator style, so that it sees streaming
responses through to their last byte (an in-flight request is one whose response has
not finished, not one whose handler has returned), and decides on a request before
anything reads its body:

- Body limits are enforced while the app reads the body: bytes are counted as they are
  pulled from the client, and the 413 goes out as soon as the count passes the limit
  (the rest is never read). Nothing is buffered here; a declared Content-Length above
  the limit is refused before reading at all.
- The large limit (an adapter upload) is only for the two upload routes, and only once
  the admin key checked out: without it the admin error is answered here, before the
  multipart body is parsed or spooled to disk.
- Early replies (413, draining 503) carry `x-request-id` and get a log line like any.
- Metrics: a request is observed under the template of the route it matched
  (`scope["route"].path`, set by routing), so the series are bounded by the app's routes;
  a path no route matches (404, 405) is no series. Health, metrics, admin and the API
  docs are not observed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.auth import admin_refusal, bearer
from server.errors import EngineUnavailable, RequestTooLarge, describe
from server.metrics import RequestInfo, log_request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths that stay open while draining, so orchestrators can watch the drain.
_ALWAYS_OPEN = frozenset({"/health", "/metrics"})
# The routes that take an adapter upload (multipart): the only ones with the large limit.
_UPLOAD = re.compile(r"/admin/adapters/(?:[^/]+/versions/)?upload")
# Route templates under these are not inference: no metrics sample, no request log line.
_NOT_OBSERVED = ("/admin", "/health", "/metrics", "/docs", "/redoc", "/openapi.json")
# Multipart framing and the config file on top of the weights (max_adapter_bytes).
_UPLOAD_OVERHEAD_BYTES = 2 * 1024 * 1024


def upload_limit(max_adapter_bytes: int) -> int:
    """The body limit of an adapter upload, whichever server admits it (the app's
    middleware, the Ray ingress)."""
    return max_adapter_bytes + _UPLOAD_OVERHEAD_BYTES


def is_upload(method: str, path: str) -> bool:
    """Whether this request is one of the two adapter upload routes."""
    return method == "POST" and _UPLOAD.fullmatch(path) is not None


def body_limit(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    *,
    admin_key: str | None,
    max_body_bytes: int,
    max_upload_bytes: int,
) -> tuple[int, Exception | None]:
    """The body limit of a request, or the error to answer at once (its admin refusal on
    an upload route, or a declared length above the limit), before reading the body."""
    limit = max_body_bytes
    if is_upload(method, path):
        refused = admin_refusal(bearer(headers), admin_key)
        if refused is not None:
            return limit, refused
        limit = max(max_upload_bytes, max_body_bytes)
    declared = content_length(headers)
    if declared is not None and declared > limit:
        return limit, too_large(limit, declared)
    return limit, None


def route_label(scope: Scope) -> str | None:
    """The label of the route this request matched (after routing), None if not observed:
    `/v1/chat/completions` -> `chat/completions`, `/tokenize` -> `tokenize`."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    # Routing records the route on a method mismatch too (405): not a request it served.
    methods = getattr(route, "methods", None)
    if methods is not None and scope.get("method") not in methods:
        return None
    if any(template == p or template.startswith(p + "/") for p in _NOT_OBSERVED):
        return None
    return template.removeprefix("/v1").lstrip("/") or "/"


class Lifecycle:
    """Shared state of admission: how many requests are in flight, whether we drain."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, wait for running ones; True if all finished in time."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class AdmissionMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        lifecycle: Lifecycle,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        observe: Callable[[RequestInfo], None],
        admin_key: str | None = None,
    ) -> None:
        self.app = app
        self.observe = observe
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.admin_key = admin_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = RequestInfo(
            request_id=_request_id(scope),
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            started=time.perf_counter(),
        )
        if self.lifecycle.draining and info.path not in _ALWAYS_OPEN:
            await _refuse(
                send,
                info,
                EngineUnavailable("the server is shutting down; retry elsewhere"),
                headers=[(b"retry-after", b"1"), (b"connection", b"close")],
            )
            return
        limit, refused = body_limit(
            info.method,
            info.path,
            scope.get("headers", []),
            admin_key=self.admin_key,
            max_body_bytes=self.max_body_bytes,
            max_upload_bytes=self.max_upload_bytes,
        )
        if refused is not None:
            await _refuse(send, info, refused)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = info.request_id
        state["info"] = info
        exchange = _Exchange(receive, send, info, limit)
        self.lifecycle.enter()
        try:
            await self.app(scope, exchange.receive, exchange.send)
        finally:
            self.lifecycle.leave()
            self._finish(scope, state, info, cut=exchange.cut)

    def _finish(self, scope: Scope, state: dict[str, Any], info: RequestInfo, *, cut: bool) -> None:
        """The response is over, however it ended: run the request's finalizers, then
        observe it (a route that is observed) or log it (one we cut short with a 413)."""
        # Handlers register here what must run once the response is over, whatever
        # happened to it (quota tickets): a streamed body may outlive its handler.
        for finalize in state.get("finalizers", ()):
            finalize()
        info.ended = time.perf_counter()
        label = route_label(scope)
        if label is not None:
            info.route = label
            if info.status == 0:
                info.status = 499  # the client left before any response started
            self.observe(info)
        elif cut:
            log_request(info)


class _Exchange:
    """One request's messages as the app sees them: the body counted against its limit
    as it is read, every response given the request's id."""

    def __init__(self, receive: Receive, send: Send, info: RequestInfo, limit: int) -> None:
        self._receive = receive
        self._send = send
        self._info = info
        self._limit = limit
        self._received = 0
        self._started = False  # the response has started
        self.cut = False  # we answered 413 ourselves: whatever the app sends after is dropped

    async def send(self, message: Message) -> None:
        if self.cut:
            return
        # Every response, errors included, carries the id the logs know it by.
        if message["type"] == "http.response.start":
            self._started = True
            self._info.status = message["status"]
            message["headers"] = [
                *message.get("headers", []),
                (b"x-request-id", self._info.request_id.encode()),
            ]
        await self._send(message)

    async def receive(self) -> Message:
        if self.cut:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                # Read no further; to the app the client is gone (its body parsing
                # fails, its answer is dropped), to the client it is a 413 now.
                if not self._started:
                    self.cut = True
                    await _refuse(self._send, self._info, too_large(self._limit, None), log=False)
                return {"type": "http.disconnect"}
        return message


def too_large(limit: int, size: int | None) -> RequestTooLarge:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return RequestTooLarge(f"{what} is above the limit of {limit} bytes")


async def _refuse(
    send: Send,
    info: RequestInfo,
    exc: Exception,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    log: bool = True,
) -> None:
    """Answer `exc` from here, before (or instead of) the app: with the request id, and
    logged like any request (`log=False`: the caller logs it when the request ends)."""
    status = await _reply(
        send, exc, [*(headers or []), (b"x-request-id", info.request_id.encode())]
    )
    info.status = status
    if log:
        info.ended = time.perf_counter()
        log_request(info)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(scope: Scope) -> str:
    """The caller's x-request-id when it is sane (it reaches logs and headers), else new."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            given = str(value.decode("latin-1"))
            if _REQUEST_ID.fullmatch(given):
                return given
    return uuid.uuid4().hex


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reply(
    send: Send, exc: Exception, headers: list[tuple[bytes, bytes]] | None = None
) -> int:
    kind, body = describe(exc)
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": kind.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
    return kind.status
