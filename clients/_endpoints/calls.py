"""How a described call becomes a method of both clients, and the shapes of calls.

Each public endpoint method only *describes* its call (an `Op`: method, path, body, which
key, whether it is safe to send twice, how to read the answer). The `endpoint`
decorator turns it into a method that runs the call: on `Client` it returns the result,
on `AsyncClient` it returns a coroutine of the result. So the two clients cannot drift
apart, and each keeps only its transport (send, retry sleeps, stream reading).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload
from urllib.parse import urlencode

import httpx

from clients._wire import Op, Spec
from clients.types import JSON, ServingDefaults

if TYPE_CHECKING:
    from clients._streams import AsyncStream, Stream
    from clients.async_client import AsyncClient
    from clients.client import Client

P = ParamSpec("P")
T = TypeVar("T")


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


# -- the shapes of calls: which key, and whether sending twice is harmless ---------------


def inference(path: str, body: JSON) -> Spec:
    # Inference changes no server state: sending it again is harmless (it costs engine time).
    return Spec("POST", path, "api", replayable=True, json=body)


def read(path: str) -> Spec:
    return Spec("GET", path, "admin", replayable=True)


def put(path: str, body: JSON) -> Spec:
    # PUT sets a state: the same state again is the same result.
    return Spec("PUT", path, "admin", replayable=True, json=body)


def create(path: str, **body: Any) -> Spec:
    # A second POST would create a second adapter or version (or fail with 409).
    return Spec("POST", path, "admin", replayable=False, **body)


def delete(path: str) -> Spec:
    # A repeated DELETE of something gone answers 404, hiding that the first one worked.
    return Spec("DELETE", path, "admin", replayable=False)


# -- bodies ------------------------------------------------------------------------------


def content(response: httpx.Response) -> bytes:
    return response.content


def given(**fields: Any) -> JSON:
    """The fields that are not None: the server's defaults apply to the others."""
    return {k: v for k, v in fields.items() if v is not None}


def with_query(path: str, **params: float | str | None) -> str:
    """`path` with the given (not None) parameters as its query string."""
    query = urlencode({k: str(v) for k, v in params.items() if v is not None})
    return path + (f"?{query}" if query else "")


def form(**fields: str | None) -> dict[str, str]:
    return {k: v for k, v in fields.items() if v is not None}


def form_bool(value: bool) -> str:
    return "true" if value else "false"


def access(owner: str | None, shared: bool) -> JSON:
    # Only what differs from the server's defaults (the operator's, private): the same
    # result, and the same bodies as before tenants existed, for servers without them.
    return {
        **({"owner": owner} if owner is not None else {}),
        **({"shared": True} if shared else {}),
    }


def defaults_body(defaults: ServingDefaults | None) -> JSON:
    # Sent only when given: the same bodies as before versions had defaults.
    return {} if not defaults else {"defaults": dict(defaults)}


def defaults_form(defaults: ServingDefaults | None) -> str | None:
    return None if not defaults else json.dumps(defaults)
