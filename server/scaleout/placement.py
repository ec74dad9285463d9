"""Which replica serves a request, without Ray: the routing key, the per-replica residency
and the in-process ASGI call. ray_serve.py wires these into Ray Serve; kept apart so
that they are unit-tested with the fake engine.

- `routing_key`: `model` (+ the A/B user) -> `"<adapter>@<version>+<digest>"`, the
  concrete version the request will run on and a prefix of its content digest (weights +
  config), resolved exactly as the replica will (registry, aliases, sticky A/B choice).
  The digest keeps Ray's per-replica model cache from ever taking one content for
  another. Base-model requests, names the registry does not know yet (adapters folders
  register on first use) and bad requests get no key: any replica, which answers them
  (errors included) itself.
- `Residency`: the versions one replica keeps in its engine, least recently used beyond
  `capacity`; the replica's own record of hits and cold loads.
- `call_asgi`: run one HTTP request through a FastAPI app in this process and yield
  the response start, then its body chunks as they come (streams stay streams);
  `collect` reads such a response whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from adapters_registry.registry import Registry
from server.errors import ModelNotFound
from server.names import parse_model, pick

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def routing_key(
    registry: Registry, base: str, body: bytes, user_header: str | None = None
) -> str | None:
    """The multiplexing key of an inference request body, or None (any replica)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return None
    model: str = payload["model"]
    user = payload.get("user")
    user = user if isinstance(user, str) and user else (user_header or None)
    try:
        name = parse_model(model, base)
        if name is None:
            return None
        picked = pick(registry, name, user)
    except (ModelNotFound, ValueError):
        return None
    record = registry.adapter(picked.adapter)
    if record is None:
        return None
    version = record.current if picked.number is None else record.version(picked.number)
    if version is None:
        return None
    return f"{picked.adapter}@{version.version}+{version.content_digest[:_DIGEST_CHARS]}"


# 64 bits of the digest: enough to tell contents apart, short in Ray's logs and metrics.
_DIGEST_CHARS = 16


def parse_key(key: str) -> tuple[str, int, str | None]:
    """(adapter, version, digest prefix or None) of a routing key."""
    rest, plus, digest = key.rpartition("+")
    if not plus:
        rest, digest = key, ""
    adapter, _, version = rest.rpartition("@")
    return adapter, int(version), digest or None


@dataclass
class Residency:
    """The adapter versions one replica holds, LRU beyond `capacity`."""

    capacity: int
    keys: OrderedDict[str, None] = field(default_factory=OrderedDict)
    hits: int = 0
    cold: int = 0

    def touch(self, key: str) -> tuple[bool, list[str]]:
        """Record a request for `key`: (already held?, keys to evict now)."""
        hit = key in self.keys
        if hit:
            self.hits += 1
            self.keys.move_to_end(key)
        else:
            self.cold += 1
            self.keys[key] = None
        evicted = []
        while len(self.keys) > self.capacity:
            evicted.append(self.keys.popitem(last=False)[0])
        return hit, evicted


@dataclass
class HttpRequest:
    """What crosses from the ingress to a replica: picklable, no sockets."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


async def call_asgi(
    app: Any,
    request: HttpRequest,
    extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through the ASGI `app`; yields a ResponseStart, then body chunks.

    Closing the generator early (the client went away) tells the app the client
    disconnected and cancels it, as a real server would: streams abort in the engine.
    """
    exchange = _Exchange(request.body)
    task = asyncio.create_task(exchange.run(app, asgi_scope(request)))
    finished = False
    try:
        while (message := await exchange.sent.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *extra_headers]
                yield ResponseStart(message["status"], headers)
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    finished = True
                    break
        await task
    finally:
        if not finished or not task.done():
            exchange.disconnected.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def collect(stream: AsyncIterator[ResponseStart | bytes]) -> tuple[ResponseStart, bytes]:
    """A whole response of call_asgi: its start and its body, for answers read at once
    (/metrics), not streamed."""
    start: ResponseStart | None = None
    chunks: list[bytes] = []
    async for item in stream:
        if isinstance(item, ResponseStart):
            start = item
        else:
            chunks.append(item)
    assert start is not None
    return start, b"".join(chunks)


def asgi_scope(request: HttpRequest) -> dict[str, Any]:
    """The ASGI scope of `request`, as a server in front of the app would give it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": list(request.headers),
        "client": request.client,
        "server": ("127.0.0.1", 80),
        "state": {},
    }


class _Exchange:
    """The two ASGI channels of one call: the app receives the body once, then waits
    for the disconnect; what the app sends is queued, and None after it returns."""

    def __init__(self, body: bytes) -> None:
        self.sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self._body: bytes | None = body

    async def run(self, app: Any, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self.receive, self.send)
        finally:
            await self.sent.put(None)

    async def receive(self) -> dict[str, Any]:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        await self.sent.put(message)
