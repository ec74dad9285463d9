"""Every call of the server, written once for both clients.

Each public method here only *describes* its call (an `Op`: method, path, body, which
key, whether it is safe to send twice, how to read the answer). The `endpoint`
decorator turns it into a method that runs the call: on `Client` it returns the result,
on `AsyncClient` it returns a coroutine of the result. So the two clients cannot drift
apart, and each keeps only its transport (send, retry sleeps, stream reading).
"""

from __future__ import annotations

import abc
import inspect
import json
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload
from urllib.parse import urlencode

import httpx

from clients._retry import RetryPolicy
from clients._wire import (
    AdapterFiles,
    Op,
    Spec,
    completion,
    data_list,
    inference_body,
    json_body,
    segment,
    upload_files,
)
from clients.types import (
    JSON,
    AdapterInfo,
    AliasInfo,
    Completion,
    DeletedAdapter,
    DeletedKey,
    DeletedTenant,
    ExposureInfo,
    FeedbackInfo,
    ModelInfo,
    NewApiKey,
    ProgressCallback,
    ServingDefaults,
    TenantInfo,
    VersionInfo,
    WarmedAdapter,
)

if TYPE_CHECKING:
    from clients._streams import AsyncStream, Stream
    from clients.async_client import AsyncClient
    from clients.client import Client

P = ParamSpec("P")
T = TypeVar("T")
_Http = TypeVar("_Http", httpx.Client, httpx.AsyncClient)
_Transport = TypeVar("_Transport", httpx.BaseTransport, httpx.AsyncBaseTransport)
_Sleep = TypeVar("_Sleep")

DEFAULT_URL = "http://127.0.0.1:8000"
# Generations can be long; connecting should not be.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
USER_AGENT = "loraswap-client/0.1"


class _Call:
    """Shared by the two decorators: the method's name, docs and signature without self."""

    def __init__(self, build: Callable[..., Any]) -> None:
        self._build = build
        self.__name__ = build.__name__
        self.__qualname__ = build.__qualname__
        self.__doc__ = build.__doc__
        signature = inspect.signature(build)
        self.__signature__ = signature.replace(
            parameters=list(signature.parameters.values())[1:],
            return_annotation=inspect.Signature.empty,
        )

    def _bind(self, run: Callable[[Any], Any], owner: object) -> Callable[..., Any]:
        build = self._build

        def call(*args: Any, **kwargs: Any) -> Any:
            return run(build(owner, *args, **kwargs))

        call.__name__, call.__qualname__, call.__doc__ = (
            self.__name__,
            self.__qualname__,
            self.__doc__,
        )
        call.__signature__ = self.__signature__  # type: ignore[attr-defined]
        return call


class endpoint(_Call, Generic[P, T]):  # a decorator: lower case, like property
    """A method that builds an `Op[T]` becomes a call returning `T` (`Client`) or a
    coroutine of `T` (`AsyncClient`)."""

    def __init__(self, build: Callable[Concatenate[Any, P], Op[T]]) -> None:
        super().__init__(build)

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> endpoint[P, T]: ...
    @overload
    def __get__(self, obj: Client, owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, obj: AsyncClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        return self if obj is None else self._bind(obj._run, obj)


class stream_endpoint(_Call, Generic[P]):  # a decorator
    """A method that builds a streaming `Spec` becomes a call returning a `Stream`
    (`Client`) or a coroutine of an `AsyncStream` (`AsyncClient`)."""

    def __init__(self, build: Callable[Concatenate[Any, P], Spec]) -> None:
        super().__init__(build)

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> stream_endpoint[P]: ...
    @overload
    def __get__(self, obj: Client, owner: type[Any]) -> Callable[P, Stream]: ...
    @overload
    def __get__(
        self, obj: AsyncClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, AsyncStream]]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        return self if obj is None else self._bind(obj._open, obj)


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


class Endpoints:
    """The server's API. Inference calls return `Completion`s (the OpenAI-shaped body and
    `served_by`, from the response headers) or streams; admin calls return the server's
    JSON as typed dicts. Every call raises a `clients.errors.LoraswapError` on failure."""

    # -- inference ---------------------------------------------------------------------

    @endpoint
    def chat(
        self, /, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> Op[Completion]:
        """A chat completion. `model` is `<base>`, `<base>:<adapter>`, an adapter or an alias;
        `params` are OpenAI's (`temperature`, `max_tokens`, `user`, ...)."""
        body = inference_body({"model": model, "messages": list(messages)}, params, stream=False)
        return Op(_inference("/v1/chat/completions", body), completion)

    @stream_endpoint
    def chat_stream(
        self, /, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> Spec:
        """A streamed chat completion: iterate the chunks; `served_by` is known at once.
        `stream_options={"include_usage": True}` adds a last chunk with the usage."""
        body = inference_body({"model": model, "messages": list(messages)}, params, stream=True)
        return _inference("/v1/chat/completions", body)

    @endpoint
    def completions(
        self, /, model: str, prompt: str | Sequence[int], **params: Any
    ) -> Op[Completion]:
        """A text completion of one prompt (text or token ids)."""
        body = inference_body({"model": model, "prompt": _prompt(prompt)}, params, stream=False)
        return Op(_inference("/v1/completions", body), completion)

    @stream_endpoint
    def completions_stream(self, /, model: str, prompt: str | Sequence[int], **params: Any) -> Spec:
        """A streamed text completion."""
        body = inference_body({"model": model, "prompt": _prompt(prompt)}, params, stream=True)
        return _inference("/v1/completions", body)

    @endpoint
    def models(self) -> Op[list[ModelInfo]]:
        """The base, every adapter (`<base>:<adapter>`) and every alias (`kind: alias`)."""
        return Op(Spec("GET", "/v1/models", "api", replayable=True), data_list)

    # -- A/B experiments ---------------------------------------------------------------

    @endpoint
    def feedback(
        self,
        /,
        response_id: str | None = None,
        *,
        request_id: str | None = None,
        label: str | int | bool | None = None,
        score: float | None = None,
        metric: str = "default",
    ) -> Op[FeedbackInfo]:
        """Report an outcome of a response served through an alias: its `response_id`
        (`completion.body["id"]`) or `request_id`, and a `label` ("positive"/"negative",
        1/0, True/False) and/or a numeric `score`, under `metric`. Sending it again
        replaces it (the last one counts). NotFoundError: no such response of yours."""
        if isinstance(label, bool):
            label = int(label)
        body = {
            "response_id": response_id,
            "request_id": request_id,
            "label": label,
            "score": score,
            "metric": metric,
        }
        body = {k: v for k, v in body.items() if v is not None}
        # Idempotent per (response, metric) on the server: safe to send twice.
        return Op(Spec("POST", "/v1/feedback", "api", replayable=True, json=body), json_body)

    @endpoint
    def exposure(self, response_id: str) -> Op[ExposureInfo]:
        """Which alias arm served one of your responses (by response id)."""
        spec = Spec("GET", f"/v1/exposures/{segment(response_id)}", "api", replayable=True)
        return Op(spec, json_body)

    @endpoint
    def experiment_report(
        self,
        alias: str,
        *,
        since: float | str | None = None,
        until: float | str | None = None,
        control: str | None = None,
    ) -> Op[JSON]:
        """The statistics of alias `alias`'s experiment (admin): per arm exposures, users,
        errors, latency, tokens, each metric's mean and 95% interval, and against the
        `control` arm (default: the first) difference, lift and p-value; and the
        sample-ratio-mismatch check. `since`/`until`: Unix seconds or ISO 8601."""
        query = {"since": since, "until": until, "control": control}
        params = urlencode({k: str(v) for k, v in query.items() if v is not None})
        path = f"/admin/aliases/{segment(alias)}/experiment" + (f"?{params}" if params else "")
        return Op(_read(path), json_body)

    @endpoint
    def experiment_plot(
        self,
        alias: str,
        *,
        since: float | str | None = None,
        until: float | str | None = None,
        metric: str | None = None,
    ) -> Op[bytes]:
        """A PNG of alias `alias`'s experiment (admin): each feedback metric's running
        mean with its 95% interval, per arm, over time (`metric`: only that one)."""
        query = {"since": since, "until": until, "metric": metric}
        params = urlencode({k: str(v) for k, v in query.items() if v is not None})
        path = f"/admin/aliases/{segment(alias)}/experiment/plot.png"
        return Op(_read(path + (f"?{params}" if params else "")), _content)

    @endpoint
    def set_guardrails(
        self,
        alias: str,
        *,
        min_exposures: int = 100,
        max_error_rate: float | None = None,
        max_p95_latency_ratio: float | None = None,
        metric: str | None = None,
        min_metric_ratio: float | None = None,
        control: str | None = None,
    ) -> Op[JSON]:
        """Set alias `alias`'s guardrails (admin): an arm past a limit, judged over at
        least `min_exposures` of its exposures, gets weight 0 at once. Limits:
        `max_error_rate` (5xx share), `max_p95_latency_ratio` (its p95 over the
        control's), `metric` + `min_metric_ratio` (its mean outcome over the control's).
        Answers the limits and the rollbacks so far."""
        body = {
            "min_exposures": min_exposures,
            "max_error_rate": max_error_rate,
            "max_p95_latency_ratio": max_p95_latency_ratio,
            "metric": metric,
            "min_metric_ratio": min_metric_ratio,
            "control": control,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return Op(_put(f"/admin/aliases/{segment(alias)}/guardrails", body), json_body)

    @endpoint
    def get_guardrails(self, alias: str) -> Op[JSON]:
        """An alias's guardrail limits and its rollbacks (`events`: rule, numbers, time)."""
        return Op(_read(f"/admin/aliases/{segment(alias)}/guardrails"), json_body)

    @endpoint
    def delete_guardrails(self, alias: str) -> Op[JSON]:
        """Remove an alias's guardrails (its rollbacks stay on record)."""
        return Op(_delete(f"/admin/aliases/{segment(alias)}/guardrails"), json_body)

    @endpoint
    def set_shadow(self, alias: str, adapter: str, fraction: float) -> Op[JSON]:
        """Run `fraction` (0..1, drawn per request) of alias `alias`'s requests also on
        `adapter` (`name` or `name@N`) (admin): after each sampled request, at the lowest
        priority, dropped first under load; its replies are recorded (lengths, latencies,
        whether greedy outputs matched: see the report), never returned."""
        body = {"adapter": adapter, "fraction": fraction}
        return Op(_put(f"/admin/aliases/{segment(alias)}/shadow", body), json_body)

    @endpoint
    def get_shadow(self, alias: str) -> Op[JSON]:
        """An alias's shadow: `adapter` and `fraction`."""
        return Op(_read(f"/admin/aliases/{segment(alias)}/shadow"), json_body)

    @endpoint
    def delete_shadow(self, alias: str) -> Op[JSON]:
        """Stop an alias's shadow traffic (its runs stay on record)."""
        return Op(_delete(f"/admin/aliases/{segment(alias)}/shadow"), json_body)

    @endpoint
    def set_ramp(
        self,
        alias: str,
        candidate: str,
        steps: Sequence[float],
        *,
        every_exposures: int | None = None,
        every_s: float | None = None,
    ) -> Op[JSON]:
        """Ramp arm `candidate` of `alias` up (admin): `steps` are its share in percent
        (`[1, 5, 25, 50, 100]`), the first applied at once, the next after
        `every_exposures` exposures and/or `every_s` seconds, each only while the
        guardrails hold (a guardrail taking the candidate out halts the ramp)."""
        body = {
            "candidate": candidate,
            "steps": list(steps),
            "every_exposures": every_exposures,
            "every_s": every_s,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return Op(_put(f"/admin/aliases/{segment(alias)}/ramp", body), json_body)

    @endpoint
    def get_ramp(self, alias: str) -> Op[JSON]:
        """An alias's ramp: its schedule, `step`, `percent` and `state` (running, done,
        halted)."""
        return Op(_read(f"/admin/aliases/{segment(alias)}/ramp"), json_body)

    @endpoint
    def delete_ramp(self, alias: str) -> Op[JSON]:
        """Stop an alias's ramp; the weights stay as they are."""
        return Op(_delete(f"/admin/aliases/{segment(alias)}/ramp"), json_body)

    # -- adapters ----------------------------------------------------------------------

    @endpoint
    def register_adapter(
        self,
        name: str,
        source: str,
        sha256: str | None = None,
        *,
        owner: str | None = None,
        shared: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> Op[AdapterInfo]:
        """Register adapter `name` as version 1 from `source`: a path inside the server's
        allowed roots (as the server sees it) or an http(s) URL of a PEFT folder.

        `owner`: the tenant it belongs to (None: the operator's); `shared`: every tenant
        may use it. Otherwise only its owner can name it (see `set_access`). `defaults`:
        the version's serving defaults, e.g. `{"system_prompt": ..., "temperature": 0}`,
        given to its requests that do not send those fields."""
        body = {
            "name": name,
            "source": source,
            "sha256": sha256,
            **_access(owner, shared),
            **_defaults(defaults),
        }
        return Op(_create("/admin/adapters", json=body), json_body)

    @endpoint
    def upload_adapter(
        self,
        name: str,
        folder_or_files: AdapterFiles,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        owner: str | None = None,
        shared: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> Op[AdapterInfo]:
        """Register adapter `name` as version 1 from local files, uploaded: a PEFT folder
        or `{"adapter_config": path, "adapter_model": path}`. `progress(sent, total)`
        follows the bytes sent. `owner`, `shared` and `defaults` as in
        `register_adapter`."""
        form = _form(
            name=name,
            sha256=sha256,
            owner=owner,
            shared="true" if shared else None,
            defaults=_defaults_form(defaults),
        )
        files = upload_files(folder_or_files, progress)
        return Op(_create("/admin/adapters/upload", form=form, files=files), json_body)

    @endpoint
    def add_version(
        self,
        name: str,
        source: str,
        sha256: str | None = None,
        make_current: bool = True,
        *,
        defaults: ServingDefaults | None = None,
    ) -> Op[VersionInfo]:
        """Add the next version of `name` from `source`, with its serving `defaults` (as
        in `register_adapter`: a version has only its own). It serves new requests at
        once, unless `make_current=False` (staged: set it current later)."""
        body = {
            "source": source,
            "sha256": sha256,
            "make_current": make_current,
            **_defaults(defaults),
        }
        return Op(_create(f"/admin/adapters/{segment(name)}/versions", json=body), json_body)

    @endpoint
    def upload_version(
        self,
        name: str,
        folder_or_files: AdapterFiles,
        sha256: str | None = None,
        make_current: bool = True,
        progress: ProgressCallback | None = None,
        *,
        defaults: ServingDefaults | None = None,
    ) -> Op[VersionInfo]:
        """Add the next version of `name` from local files, uploaded (see `upload_adapter`)."""
        form = _form(
            sha256=sha256, make_current=_bool(make_current), defaults=_defaults_form(defaults)
        )
        files = upload_files(folder_or_files, progress)
        path = f"/admin/adapters/{segment(name)}/versions/upload"
        return Op(_create(path, form=form, files=files), json_body)

    @endpoint
    def list_adapters(self) -> Op[list[AdapterInfo]]:
        """Every adapter with its versions, the current one, and engine residency."""
        return Op(_read("/admin/adapters"), data_list)

    @endpoint
    def get_adapter(self, name: str) -> Op[AdapterInfo]:
        """One adapter with its versions."""
        return Op(_read(f"/admin/adapters/{segment(name)}"), json_body)

    @endpoint
    def set_current(self, name: str, version: int) -> Op[AdapterInfo]:
        """Route new requests for `name` to `version`; running requests finish on theirs."""
        return _set_current(name, version)

    @endpoint
    def rollback(self, name: str, version: int) -> Op[AdapterInfo]:
        """Make an earlier `version` current again: the same call as `set_current`."""
        return _set_current(name, version)

    @endpoint
    def delete_version(self, name: str, version: int) -> Op[VersionInfo]:
        """Delete one version (ConflictError while it is current or an alias pins it)."""
        path = f"/admin/adapters/{segment(name)}/versions/{int(version)}"
        return Op(_delete(path), json_body)

    @endpoint
    def delete_adapter(self, name: str) -> Op[DeletedAdapter]:
        """Delete an adapter and all its versions (ConflictError while an alias routes to it)."""
        return Op(_delete(f"/admin/adapters/{segment(name)}"), json_body)

    @endpoint
    def set_access(
        self, name: str, owner: str | None = None, shared: bool = False
    ) -> Op[AdapterInfo]:
        """Set who may use adapter `name`: its `owner` tenant (None: the operator) and, when
        `shared`, every tenant. Both are set: the defaults make it the operator's, private.
        A tenant that may not use it gets NotFoundError, as if it did not exist."""
        spec = _put(f"/admin/adapters/{segment(name)}/access", {"owner": owner, "shared": shared})
        return Op(spec, json_body)

    @endpoint
    def pin(self, name: str, pinned: bool = True) -> Op[AdapterInfo]:
        """Keep `name` loaded in the engine, also across restarts (`pinned=False` unpins)."""
        spec = _put(f"/admin/adapters/{segment(name)}/pin", {"pinned": pinned})
        return Op(spec, json_body)

    @endpoint
    def warm(self, name: str) -> Op[WarmedAdapter]:
        """Load the current version of `name` into the engine now, before its first request."""
        # A POST, but loading what is already loaded changes nothing: safe to send twice.
        spec = Spec("POST", f"/admin/adapters/{segment(name)}/warm", "admin", replayable=True)
        return Op(spec, json_body)

    # -- aliases -----------------------------------------------------------------------

    @endpoint
    def list_aliases(self) -> Op[list[AliasInfo]]:
        """Every A/B alias with its variants and weights."""
        return Op(_read("/admin/aliases"), data_list)

    @endpoint
    def get_alias(self, name: str) -> Op[AliasInfo]:
        """One alias."""
        return Op(_read(f"/admin/aliases/{segment(name)}"), json_body)

    @endpoint
    def set_alias(
        self,
        name: str,
        variants: Mapping[str, int],
        *,
        owner: str | None = None,
        shared: bool = False,
    ) -> Op[AliasInfo]:
        """Create or replace alias `name`: `{"pirate@3": 90, "formal": 10}` (`name` follows
        that adapter's current version, `name@N` pins version N). Takes effect at once.

        `owner`/`shared` as for adapters; every variant must be usable by whoever may use
        the alias (UnprocessableEntityError otherwise)."""
        body = {"variants": dict(variants), **_access(owner, shared)}
        return Op(_put(f"/admin/aliases/{segment(name)}", body), json_body)

    @endpoint
    def delete_alias(self, name: str) -> Op[AliasInfo]:
        """Delete an alias; answers what it was."""
        return Op(_delete(f"/admin/aliases/{segment(name)}"), json_body)

    # -- tenants and API keys ----------------------------------------------------------

    @endpoint
    def put_tenant(
        self, name: str, max_concurrent: int | None = None, tokens_per_minute: int | None = None
    ) -> Op[TenantInfo]:
        """Create tenant `name`, or set its quotas: `max_concurrent` requests running at
        once, `tokens_per_minute` (prompt + completion). None is no limit, so both are
        set: pass the ones to keep too. Over a quota, its requests get RateLimitError."""
        body = {"max_concurrent": max_concurrent, "tokens_per_minute": tokens_per_minute}
        return Op(_put(f"/admin/tenants/{segment(name)}", body), json_body)

    @endpoint
    def list_tenants(self) -> Op[list[TenantInfo]]:
        """Every tenant with its quotas, key ids and requests running."""
        return Op(_read("/admin/tenants"), data_list)

    @endpoint
    def get_tenant(self, name: str) -> Op[TenantInfo]:
        """One tenant."""
        return Op(_read(f"/admin/tenants/{segment(name)}"), json_body)

    @endpoint
    def delete_tenant(self, name: str) -> Op[DeletedTenant]:
        """Delete a tenant and its keys (ConflictError while it owns an adapter or alias)."""
        return Op(_delete(f"/admin/tenants/{segment(name)}"), json_body)

    @endpoint
    def create_key(self, tenant: str) -> Op[NewApiKey]:
        """A new API key for `tenant`. `key` is in this answer only (the server keeps its
        hash): store it now. Inference with `Client(api_key=key)` acts as that tenant."""
        return Op(_create(f"/admin/tenants/{segment(tenant)}/keys"), json_body)

    @endpoint
    def delete_key(self, tenant: str, key_id: str) -> Op[DeletedKey]:
        """Revoke one of `tenant`'s keys by its id (the `key_id` of `create_key`)."""
        path = f"/admin/tenants/{segment(tenant)}/keys/{segment(key_id)}"
        return Op(_delete(path), json_body)


# Inference changes no server state: sending it again is harmless (it costs engine time).
def _inference(path: str, body: JSON) -> Spec:
    return Spec("POST", path, "api", replayable=True, json=body)


def _content(response: httpx.Response) -> bytes:
    return response.content


def _read(path: str) -> Spec:
    return Spec("GET", path, "admin", replayable=True)


def _put(path: str, body: JSON) -> Spec:
    # PUT sets a state: the same state again is the same result.
    return Spec("PUT", path, "admin", replayable=True, json=body)


def _create(path: str, **body: Any) -> Spec:
    # A second POST would create a second adapter or version (or fail with 409).
    return Spec("POST", path, "admin", replayable=False, **body)


def _delete(path: str) -> Spec:
    # A repeated DELETE of something gone answers 404, hiding that the first one worked.
    return Spec("DELETE", path, "admin", replayable=False)


def _set_current(name: str, version: int) -> Op[AdapterInfo]:
    return Op(_put(f"/admin/adapters/{segment(name)}/current", {"version": version}), json_body)


def _form(**fields: str | None) -> dict[str, str]:
    return {k: v for k, v in fields.items() if v is not None}


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _access(owner: str | None, shared: bool) -> JSON:
    # Only what differs from the server's defaults (the operator's, private): the same
    # result, and the same bodies as before tenants existed, for servers without them.
    return {
        **({"owner": owner} if owner is not None else {}),
        **({"shared": True} if shared else {}),
    }


def _defaults(defaults: ServingDefaults | None) -> JSON:
    # Sent only when given: the same bodies as before versions had defaults.
    return {} if not defaults else {"defaults": dict(defaults)}


def _defaults_form(defaults: ServingDefaults | None) -> str | None:
    return None if not defaults else json.dumps(defaults)


def _prompt(prompt: str | Sequence[int]) -> str | list[int]:
    return prompt if isinstance(prompt, str) else list(prompt)
