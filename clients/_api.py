"""Every call of the server, written once for both clients: `BaseClient` (configuration
and request building) and `Endpoints` (the calls, each only described; see
`clients._endpoints.calls` for how a description becomes a method of `Client` and of
`AsyncClient`).
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Generic, TypeVar

import httpx

from clients._endpoints.adapters import AdapterEndpoints
from clients._endpoints.aliases import AliasEndpoints
from clients._endpoints.calls import endpoint, stream_endpoint
from clients._endpoints.experiments import ExperimentEndpoints, OutcomeEndpoints
from clients._endpoints.inference import InferenceEndpoints
from clients._endpoints.tenants import TenantEndpoints
from clients._retry import RetryPolicy
from clients._wire import Spec

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "BaseClient",
    "Endpoints",
    "endpoint",
    "stream_endpoint",
]

_Http = TypeVar("_Http", httpx.Client, httpx.AsyncClient)
_Transport = TypeVar("_Transport", httpx.BaseTransport, httpx.AsyncBaseTransport)
_Sleep = TypeVar("_Sleep")

DEFAULT_URL = "http://127.0.0.1:8000"
# Generations can be long; connecting should not be.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
USER_AGENT = "loraswap-client/0.1"


class BaseClient(abc.ABC, Generic[_Http, _Transport, _Sleep]):
    """Configuration and request building; the subclasses send."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        admin_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        transport: _Transport | None = None,
        http_client: _Http | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: _Sleep | None = None,
    ) -> None:
        """Talk to the loraswap server at `base_url` (its root, not `/v1`).

        `api_key` (a tenant's key, `lsk_...`, from `create_key`) goes with inference calls
        and `admin_key` with `/admin` calls, each as `Authorization: Bearer`. Once a server
        has any tenant key, inference without a valid one is refused (AuthenticationError);
        the admin key is accepted there too and reaches every adapter.

        `transport` replaces httpx's network transport (tests, in-process apps);
        `http_client` replaces the whole httpx client (proxies, TLS, limits), and is then
        the caller's to close, its own timeout applying. `sleep` replaces the sleep between
        retries (tests).
        """
        if transport is not None and http_client is not None:
            raise ValueError("give transport or http_client, not both")
        if http_client is not None and not isinstance(http_client, self._http_class()):
            # e.g. starlette's TestClient, built on another package (httpx2): its errors
            # and responses would slip past this client's handling.
            raise TypeError(f"http_client must be an httpx.{self._http_class().__name__}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_key = admin_key
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self._headers = httpx.Headers(headers)
        self._headers.setdefault("user-agent", USER_AGENT)
        self._owns_http = http_client is None
        self._http: _Http = (
            http_client if http_client is not None else self._new_http(transport, timeout)
        )
        self._sleep: _Sleep = sleep if sleep is not None else self._default_sleep()

    @abc.abstractmethod
    def _http_class(self) -> type[_Http]:
        """httpx.Client or httpx.AsyncClient."""

    @abc.abstractmethod
    def _new_http(self, transport: _Transport | None, timeout: float | httpx.Timeout) -> _Http:
        """The httpx client to use when none is given."""

    @abc.abstractmethod
    def _default_sleep(self) -> _Sleep:
        """time.sleep or asyncio.sleep."""

    def _authorization(self, spec: Spec) -> str | None:
        key = self.admin_key if spec.auth == "admin" else self.api_key
        return f"Bearer {key}" if key else None

    def _request(self, spec: Spec, stack: ExitStack) -> httpx.Request:
        """The httpx request of a call; files it uploads are opened onto `stack`."""
        headers = self._headers.copy()
        authorization = self._authorization(spec)
        if authorization is not None:
            headers["authorization"] = authorization
        return self._http.build_request(
            spec.method,
            self.base_url + spec.path,
            json=spec.json,
            data=spec.form,
            files=spec.files(stack) if spec.files is not None else None,
            headers=headers,
        )

    def _label(self, request: httpx.Request, retries_done: int) -> None:
        """A fresh x-request-id per attempt (the engine may still run an abandoned one),
        related across retries: `<id>`, `<id>.1`, `<id>.2`, as it appears in server logs."""
        if "x-request-id" in self._headers:
            return  # the caller chose one for every request
        if retries_done == 0:
            request.headers["x-request-id"] = uuid.uuid4().hex
        else:
            first = request.headers["x-request-id"].split(".")[0]
            request.headers["x-request-id"] = f"{first}.{retries_done}"


class Endpoints(
    InferenceEndpoints,
    OutcomeEndpoints,
    AdapterEndpoints,
    AliasEndpoints,
    ExperimentEndpoints,
    TenantEndpoints,
):
    """The server's API. Inference calls return `Completion`s (the OpenAI-shaped body and
    `served_by`, from the response headers) or streams; admin calls return the server's
    JSON as typed dicts. Every call raises a `clients.errors.LoraswapError` on failure.

    One class per resource, in `clients/_endpoints/`: inference, outcomes and
    experiments, adapters, aliases, tenants and keys."""
