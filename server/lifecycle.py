"""Request admission at the ASGI level: body size limits, in-flight counting, draining.

A pure ASGI middleware rather than FastAPI's decorator style, so that it sees streaming
responses through to their last byte (an in-flight request is one whose response has
not finished, not one whose handler has returned).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.errors import EngineUnavailable, RequestTooLarge, describe
from server.metrics import RequestInfo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths that stay open while draining, so orchestrators can watch the drain.
_ALWAYS_OPEN = ("/health", "/metrics")
# Requests that get a metrics sample and a log line.
_OBSERVED = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


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
    ) -> None:
        self.app = app
        self.observe = observe
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self.lifecycle.draining and not path.startswith(_ALWAYS_OPEN):
            await _reply(
                send,
                EngineUnavailable("the server is shutting down; retry elsewhere"),
                headers=[(b"retry-after", b"1"), (b"connection", b"close")],
            )
            return
        limit = self.max_upload_bytes if path.endswith("/upload") else self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reply(send, _too_large(limit, declared))
            return
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # No length announced (chunked): read the body here, bounded, and replay it.
            buffered = await _read_bounded(receive, limit)
            if buffered is None:
                await _reply(send, _too_large(limit, None))
                return
            receive = _replay(buffered, receive)
        request_id = _request_id(scope)
        info = RequestInfo(
            request_id=request_id,
            method=scope.get("method", ""),
            path=path,
            started=time.perf_counter(),
        )
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["info"] = info

        async def send_with_id(message: Message) -> None:
            # Every response, errors included, carries the id the logs know it by.
            if message["type"] == "http.response.start":
                info.status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        self.lifecycle.enter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.lifecycle.leave()
            # Handlers register here what must run once the response is over, whatever
            # happened to it (quota tickets): a streamed body may outlive its handler.
            for finalize in state.get("finalizers", ()):
                finalize()
            info.ended = time.perf_counter()
            if path.startswith(_OBSERVED):
                if info.status == 0:
                    info.status = 499  # the client left before any response started
                self.observe(info)


def _too_large(limit: int, size: int | None) -> RequestTooLarge:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return RequestTooLarge(f"{what} is above the limit of {limit} bytes")


async def _read_bounded(receive: Receive, limit: int) -> bytes | None:
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: http.disconnect when the client leaves

    return replay


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(scope: Scope) -> str:
    """The caller's x-request-id when it is sane (it reaches logs and headers), else new."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            given = str(value.decode("latin-1"))
            if _REQUEST_ID.fullmatch(given):
                return given
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reply(
    send: Send, exc: Exception, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
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
