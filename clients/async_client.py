"""The asyncio client: the same calls as `Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import TypeVar

import httpx

from clients._api import BaseClient, Endpoints
from clients._closing import AsyncClosing
from clients._streams import AsyncStream
from clients._wire import Op, Spec, settle

T = TypeVar("T")


class AsyncClient(
    Endpoints,
    BaseClient[httpx.AsyncClient, httpx.AsyncBaseTransport, Callable[[float], Awaitable[None]]],
    AsyncClosing,
):
    """An asyncio client of a loraswap server: `await client.chat(...)`,
    `stream = await client.chat_stream(...)` then `async for chunk in stream`.

    Use it as an async context manager, or `await close()`, to release its connections.
    """

    def _http_class(self) -> type[httpx.AsyncClient]:
        return httpx.AsyncClient

    def _new_http(
        self, transport: httpx.AsyncBaseTransport | None, timeout: float | httpx.Timeout
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport, timeout=timeout)

    def _default_sleep(self) -> Callable[[float], Awaitable[None]]:
        return asyncio.sleep

    async def _run(self, op: Op[T]) -> T:
        with ExitStack() as files:
            response = await self._send(op.spec, files, stream=False)
        return op.parse(response)

    async def _open(self, spec: Spec) -> AsyncStream:
        with ExitStack() as files:
            return AsyncStream(await self._send(spec, files, stream=True))

    async def _send(self, spec: Spec, files: ExitStack, *, stream: bool) -> httpx.Response:
        request = self._request(spec, files)
        retries = 0
        while True:
            self._label(request, retries)
            outcome = await self._attempt(request, stream)
            delay = self.retry_policy.delay(retries, outcome, replayable=spec.replayable)
            if delay is None:
                return settle(request, outcome)
            await self._sleep(delay)
            retries += 1

    async def _attempt(
        self, request: httpx.Request, stream: bool
    ) -> httpx.Response | httpx.TransportError:
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            return exc
        if stream and response.is_error:
            await response.aread()  # the error's body; this also frees the connection
        return response

    async def close(self) -> None:
        """Close the connections (not those of an `http_client` you gave)."""
        if self._owns_http:
            await self._http.aclose()
