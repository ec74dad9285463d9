"""The synchronous client: `Client(...).chat(...)`, `Client(...).register_adapter(...)`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import TypeVar

import httpx

from clients._api import BaseClient, Endpoints
from clients._closing import Closing
from clients._streams import Stream
from clients._wire import Op, Spec, settle

T = TypeVar("T")


class Client(
    Endpoints, BaseClient[httpx.Client, httpx.BaseTransport, Callable[[float], None]], Closing
):
    """A blocking client of a loraswap server: inference and admin calls.

    Use it as a context manager, or call `close()`, to release its connections. The
    calls are documented on `Endpoints`; errors are `clients.errors.LoraswapError`s.
    """

    def _http_class(self) -> type[httpx.Client]:
        return httpx.Client

    def _new_http(
        self, transport: httpx.BaseTransport | None, timeout: float | httpx.Timeout
    ) -> httpx.Client:
        return httpx.Client(transport=transport, timeout=timeout)

    def _default_sleep(self) -> Callable[[float], None]:
        return time.sleep

    def _run(self, op: Op[T]) -> T:
        with ExitStack() as files:
            response = self._send(op.spec, files, stream=False)
        return op.parse(response)

    def _open(self, spec: Spec) -> Stream:
        with ExitStack() as files:
            return Stream(self._send(spec, files, stream=True))

    def _send(self, spec: Spec, files: ExitStack, *, stream: bool) -> httpx.Response:
        request = self._request(spec, files)
        retries = 0
        while True:
            self._label(request, retries)
            outcome = self._attempt(request, stream)
            delay = self.retry_policy.delay(retries, outcome, replayable=spec.replayable)
            if delay is None:
                return settle(request, outcome)
            self._sleep(delay)
            retries += 1

    def _attempt(
        self, request: httpx.Request, stream: bool
    ) -> httpx.Response | httpx.TransportError:
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            return exc
        if stream and response.is_error:
            response.read()  # the error's body; this also frees the connection
        return response

    def close(self) -> None:
        """Close the connections (not those of an `http_client` you gave)."""
        if self._owns_http:
            self._http.close()
