"""Streamed completions: an open response read as server-sent events, chunk by chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx

from clients._closing import AsyncClosing, Closing
from clients._wire import SSEDecoder
from clients.errors import connection_error
from clients.types import JSON, ServedBy


class _StreamBase:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.served_by = ServedBy.from_headers(response.headers)
        """What serves this stream: known from the headers, before the first chunk."""
        self._decoder = SSEDecoder(self.served_by.request_id)

    @contextmanager
    def _reading(self) -> Iterator[SSEDecoder]:
        """The decoder; a broken connection becomes APIConnectionError, and a stream that
        ends without `data: [DONE]` too (it would look like a complete, shorter reply)."""
        try:
            yield self._decoder
        except httpx.TransportError as exc:
            raise connection_error(exc, self.served_by.request_id) from exc
        self._decoder.finish()


class Stream(_StreamBase, Closing):
    """The chunks (OpenAI `*.chunk` dicts) of a streamed completion; iterate once.

    Raises the typed error of an error frame, and `APIConnectionError` when the stream
    ends without `data: [DONE]`. The response closes when iteration ends; use it as a
    context manager (or call `close()`) to close a stream you stop reading early.
    """

    def __iter__(self) -> Iterator[JSON]:
        with self, self._reading() as decoder:
            for line in self.response.iter_lines():
                if (chunk := decoder.feed(line)) is not None:
                    yield chunk

    def close(self) -> None:
        """Close the response (the server then cancels the request in the engine)."""
        self.response.close()


class AsyncStream(_StreamBase, AsyncClosing):
    """`Stream` for `AsyncClient`: `async for chunk in stream`, `async with stream`."""

    async def __aiter__(self) -> AsyncIterator[JSON]:
        async with self:
            with self._reading() as decoder:
                async for line in self.response.aiter_lines():
                    if (chunk := decoder.feed(line)) is not None:
                        yield chunk

    async def close(self) -> None:
        """Close the response (the server then cancels the request in the engine)."""
        await self.response.aclose()
