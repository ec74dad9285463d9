"""The wire format, with no I/O: what a call sends (`Spec`), how its answer is read (`Op`),
server-sent events, and upload bodies. Shared by the sync and the async client."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from clients._retry import parse_retry_after
from clients.errors import (
    APIConnectionError,
    APIStatusError,
    LoraswapError,
    connection_error,
    status_error,
    stream_error,
)
from clients.types import JSON, Completion, ProgressCallback, ServedBy

T = TypeVar("T")

Auth = Literal["api", "admin"]
"""Which key goes in `Authorization: Bearer`: the inference key or the admin key."""

FileField = tuple[str, IO[bytes], str]  # (file name, open file, content type)
FilesOpener = Callable[[ExitStack], dict[str, FileField]]

PathLike = str | os.PathLike[str]
AdapterFiles = PathLike | Mapping[str, PathLike]
"""An adapter to upload: its folder (with `adapter_config.json` and
`adapter_model.safetensors`), or `{"adapter_config": path, "adapter_model": path}`."""

_UPLOAD_FIELDS = {
    # form field -> (file name in a PEFT folder, content type)
    "adapter_config": ("adapter_config.json", "application/json"),
    "adapter_model": ("adapter_model.safetensors", "application/octet-stream"),
}


@dataclass(frozen=True)
class Spec:
    """One HTTP call, described: the clients turn it into a request and send it.

    `replayable` says whether sending it twice is harmless (see `_retry`).
    """

    method: str
    path: str
    auth: Auth
    replayable: bool
    json: object = None
    form: Mapping[str, str] | None = None
    files: FilesOpener | None = None  # opened per call, closed when the call ends


@dataclass(frozen=True)
class Op(Generic[T]):
    """A call and how to read its successful answer."""

    spec: Spec
    parse: Callable[[httpx.Response], T]


# -- building --------------------------------------------------------------------------


def segment(name: str) -> str:
    """A name as one URL path segment: `/` and friends are escaped, never interpreted."""
    if name in ("", ".", ".."):
        # Escaping cannot keep these from meaning "this" or "parent" folder in a URL.
        raise ValueError(f"invalid name {name!r}")
    return quote(name, safe="")


def inference_body(fixed: Mapping[str, Any], params: Mapping[str, Any], stream: bool) -> JSON:
    """The JSON body of an inference call: `fixed` fields, the caller's params, `stream`."""
    if "stream" in params:
        raise TypeError("pass no `stream`: call the *_stream method to stream")
    return {**fixed, **params, "stream": stream}


def upload_files(files: AdapterFiles, progress: ProgressCallback | None) -> FilesOpener:
    """The multipart files of an upload; checked now, opened when the call is sent."""
    if isinstance(files, Mapping):
        unknown = set(files) - set(_UPLOAD_FIELDS)
        missing = set(_UPLOAD_FIELDS) - set(files)
        if unknown or missing:
            raise ValueError(
                f"upload files must be keyed {sorted(_UPLOAD_FIELDS)}; "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        paths = {field: Path(files[field]) for field in _UPLOAD_FIELDS}
    else:
        folder = Path(files)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        paths = {field: folder / name for field, (name, _) in _UPLOAD_FIELDS.items()}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")

    def open_files(stack: ExitStack) -> dict[str, FileField]:
        total = sum(p.stat().st_size for p in paths.values())
        meter = _Meter(list(paths), total, progress)
        return {
            field: (
                _UPLOAD_FIELDS[field][0],
                stack.enter_context(_MeteredFile(path, meter, field)),
                _UPLOAD_FIELDS[field][1],
            )
            for field, path in paths.items()
        }

    return open_files


class _Meter:
    """Sums how far the files of an upload have been read, for one progress callback.

    httpx reads the files in order, each after a seek to its start; a retry seeks the
    first one back, so a rewound file forgets its count and that of every file after it.
    """

    def __init__(self, order: list[str], total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self._order = order
        self._callback = callback
        self._positions: dict[str, int] = {}
        self._reported: int | None = None

    def update(self, key: str, position: int, *, rewound: bool = False) -> None:
        if rewound:
            for later in self._order[self._order.index(key) :]:
                self._positions.pop(later, None)
        self._positions[key] = position
        sent = sum(self._positions.values())
        if self._callback is not None and sent != self._reported:
            self._reported = sent
            self._callback(sent, self.total)


class _MeteredFile(io.BufferedReader):
    """A file that reports its read position: httpx reads uploads in chunks through it.

    A real file (it has a `fileno`), so httpx still sends a Content-Length, and seekable,
    so a retried upload reads it again from the start (and the progress goes back).
    """

    def __init__(self, path: Path, meter: _Meter, key: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._meter, self._key = meter, key

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self._meter.update(self._key, self.tell())
        return chunk

    def seek(self, target: int, whence: int = os.SEEK_SET, /) -> int:
        position = super().seek(target, whence)
        self._meter.update(self._key, position, rewound=True)
        return position


# -- reading ---------------------------------------------------------------------------


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON of a successful answer."""
    try:
        return response.json()
    except ValueError:
        raise APIStatusError(
            f"the server answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        ) from None


def data_list(response: httpx.Response) -> Any:
    """The `data` list of a list answer (`{"object": "list", "data": [...]}`)."""
    return json_body(response)["data"]


def completion(response: httpx.Response) -> Completion:
    return Completion(body=json_body(response), served_by=ServedBy.from_headers(response.headers))


def response_error(response: httpx.Response, sent_request_id: str | None) -> APIStatusError:
    """The typed error for an error answer (its body must have been read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    # The server puts x-request-id on successes only; ours is the one it logged.
    request_id = response.headers.get("x-request-id") or sent_request_id
    return status_error(
        response.status_code,
        body,
        request_id=request_id,
        reason=response.reason_phrase,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def settle(
    request: httpx.Request, outcome: httpx.Response | httpx.TransportError
) -> httpx.Response:
    """The final outcome of a call's attempts: the answer, or the error to raise."""
    request_id = request.headers.get("x-request-id")
    if isinstance(outcome, httpx.TransportError):
        raise connection_error(outcome, request_id) from outcome
    if outcome.is_error:
        raise response_error(outcome, request_id)
    return outcome


class SSEDecoder:
    """Server-sent events to chunk dicts, one line at a time (without its line break).

    `data: {...}` lines make a chunk, `data: [DONE]` ends the stream, and a chunk
    `{"error": {...}}` (what the server sends when a stream fails after its first byte)
    raises the typed error.
    """

    def __init__(self, request_id: str | None = None) -> None:
        self.done = False
        self._data: list[str] = []
        self._request_id = request_id

    def feed(self, line: str) -> JSON | None:
        """The chunk an event completes with this line, if any (none after `[DONE]`)."""
        if self.done:
            return None
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def finish(self) -> None:
        """The stream's bytes have ended: raises if it was cut short (no `[DONE]`), which
        would otherwise look like a complete, only shorter, reply."""
        if self._dispatch() is not None or not self.done:
            raise APIConnectionError(
                "the stream ended before data: [DONE]", request_id=self._request_id
            )

    def _dispatch(self) -> JSON | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        if data == "[DONE]":
            self.done = True
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            raise LoraswapError(
                f"invalid JSON in a stream event: {data[:200]!r}", request_id=self._request_id
            ) from None
        if not isinstance(chunk, dict):
            raise LoraswapError(f"a stream event is not an object: {data[:200]!r}")
        if isinstance(chunk.get("error"), Mapping):
            raise stream_error(chunk["error"], request_id=self._request_id)
        return chunk
