"""`with` / `async with` support for whatever has a `close()`: clients and streams."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import TypeVar

_S = TypeVar("_S", bound="Closing")
_A = TypeVar("_A", bound="AsyncClosing")


class Closing(abc.ABC):
    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection(s)."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing(abc.ABC):
    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection(s)."""

    async def __aenter__(self: _A) -> _A:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
