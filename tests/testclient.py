"""The response type of Starlette's TestClient, for annotations: httpx2's Response when
httpx2 is installed (starlette.testclient prefers it; the openai dev dependency brings
it), else httpx's. `httpx.Response` is a different class then."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from httpx2 import Response as ClientResponse
else:
    from starlette import testclient

    ClientResponse = testclient.httpx.Response  # whichever starlette imported

__all__ = ["ClientResponse"]
