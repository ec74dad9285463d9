"""The clients' retries, error mapping and SSE parsing against scripted transports
(`httpx.MockTransport`): exact control of statuses, headers and failures, no sleeping."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    LoraswapError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    UnprocessableEntityError,
    parse_retry_after,
)
from clients._wire import SSEDecoder, segment
from clients.errors import status_error, stream_error
from tests.adapters import make_adapter

Reply = httpx.Response | Exception
OK_ADAPTER = {"name": "a", "current_version": 1, "pinned": False, "created_at": 0, "versions": []}
HI = [{"role": "user", "content": "hi"}]


class Script(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A transport that answers each attempt with the next scripted reply, and records them.

    Not httpx.MockTransport: that one reads the request into memory first, which would
    hide whether a retried upload reads its files again.
    """

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.headers: list[dict[str, str]] = []  # as sent: a retry reuses the request
        self.bodies: list[bytes] = []
        self.sleeps: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.handle_request(request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.headers.append(dict(request.headers))
        self.bodies.append(b"".join(request.stream))  # type: ignore[arg-type]
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            if isinstance(reply, httpx.RequestError):
                reply.request = request
            raise reply
        return reply

    def client(self, **kwargs: Any) -> Client:
        return Client(
            "http://srv",
            admin_key="k",
            transport=self,
            sleep=self.sleeps.append,
            **kwargs,
        )


def error(
    status: int, code: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"error": {"message": f"failed {status}", "type": "x", "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def ok(body: Any = None) -> httpx.Response:
    return httpx.Response(200, json=OK_ADAPTER if body is None else body)


# -- Retry-After and backoff -----------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured(status: int) -> None:
    script = Script(error(status, headers={"retry-after": "3"}), ok())
    assert script.client().get_adapter("a")["name"] == "a"
    assert len(script.requests) == 2
    assert script.sleeps == [3.0]


def test_retry_after_http_date_is_honoured() -> None:
    when = formatdate(time.time() + 30, usegmt=True)
    script = Script(error(503, headers={"retry-after": when}), ok())
    script.client().get_adapter("a")
    assert len(script.sleeps) == 1
    assert 28 <= script.sleeps[0] <= 30


def test_retry_after_longer_than_the_cap_is_not_waited_for() -> None:
    script = Script(error(503, headers={"retry-after": "3600"}), ok())
    with pytest.raises(ServiceUnavailableError):
        script.client().get_adapter("a")
    assert (len(script.requests), script.sleeps) == (1, [])


def test_exponential_backoff_with_jitter_then_the_error() -> None:
    script = Script(error(503), error(503), error(503), error(503))
    client = script.client(max_retries=3)
    with pytest.raises(ServiceUnavailableError) as info:
        client.get_adapter("a")
    assert len(script.requests) == 4
    assert info.value.message == "failed 503"
    first, second, third = script.sleeps
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0 and 1.0 <= third <= 2.0

    script = Script(error(503), error(503), ok())
    client = script.client()
    client.retry_policy = RetryPolicy(max_retries=2, rand=lambda: 1.0)
    client.get_adapter("a")
    assert script.sleeps == [0.5, 1.0]


def test_max_retries_zero_sends_once() -> None:
    script = Script(error(503))
    with pytest.raises(ServiceUnavailableError):
        script.client(max_retries=0).get_adapter("a")
    assert len(script.requests) == 1


def test_each_attempt_has_its_own_related_request_id() -> None:
    script = Script(error(503), error(429), ok())
    script.client().get_adapter("a")
    ids = [h["x-request-id"] for h in script.headers]
    assert ids[1:] == [f"{ids[0]}.1", f"{ids[0]}.2"]


def test_a_callers_request_id_is_kept() -> None:
    script = Script(error(503), ok())
    script.client(headers={"X-Request-ID": "mine"}).get_adapter("a")
    assert [h["x-request-id"] for h in script.headers] == ["mine", "mine"]


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (500, InternalServerError),
    ],
)
def test_no_retry_on_client_errors_or_500(status: int, cls: type[APIStatusError]) -> None:
    script = Script(error(status, "some_code"), ok())
    with pytest.raises(cls) as info:
        script.client().get_adapter("a")
    assert (len(script.requests), script.sleeps) == (1, [])
    assert (info.value.status, info.value.code) == (status, "some_code")


# -- what is safe to send twice --------------------------------------------------------


def test_once_only_writes_are_not_retried_on_503() -> None:
    # The server commits, then talks to the engine: a 503 may follow a committed change.
    script = Script(error(503), ok())
    with pytest.raises(ServiceUnavailableError):
        script.client().add_version("a", "/src")
    script = Script(error(503), ok())
    with pytest.raises(ServiceUnavailableError):
        script.client().delete_version("a", 1)
    assert len(script.requests) == 1


def test_retry_after_is_on_the_error_when_retries_end() -> None:
    script = Script(*(error(429, "rate_limit_exceeded", {"retry-after": "7"}) for _ in range(3)))
    with pytest.raises(RateLimitError) as info:
        script.client().chat("tiny", HI)
    assert (info.value.retry_after, script.sleeps) == (7.0, [7.0, 7.0])

    script = Script(error(429, headers={"retry-after": "3600"}))  # above the cap: not waited
    with pytest.raises(RateLimitError) as info:
        script.client().chat("tiny", HI)
    assert (info.value.retry_after, script.sleeps) == (3600.0, [])

    when = formatdate(time.time() + 30, usegmt=True)
    script = Script(error(503, "server_overloaded", {"retry-after": when}))
    with pytest.raises(ServiceUnavailableError) as overloaded:
        script.client(max_retries=0).chat("tiny", HI)
    assert overloaded.value.retry_after is not None and 28 <= overloaded.value.retry_after <= 30

    script = Script(error(429))
    with pytest.raises(RateLimitError) as info:
        script.client(max_retries=0).chat("tiny", HI)
    assert info.value.retry_after is None  # no Retry-After sent
    with pytest.raises(NotFoundError) as missing:
        Script(error(404)).client().get_adapter("a")
    assert missing.value.retry_after is None


def test_once_only_writes_are_retried_when_surely_not_done() -> None:
    script = Script(error(429, headers={"retry-after": "1"}), ok())
    script.client().register_adapter("a", "/src")
    assert len(script.requests) == 2
    script = Script(httpx.ConnectError("refused"), ok())
    script.client().delete_adapter("a")
    assert len(script.requests) == 2
    script = Script(error(429), ok())
    script.client().create_key("t")
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "call",
    [lambda c: c.create_key("t"), lambda c: c.delete_key("t", "k"), lambda c: c.delete_tenant("t")],
)
def test_key_and_tenant_writes_are_once_only(call: Callable[[Client], Any]) -> None:
    # A second create_key would make a second key; a second delete would answer 404.
    script = Script(error(503), httpx.ReadTimeout("slow"), ok())
    with pytest.raises(ServiceUnavailableError):
        call(script.client())
    assert len(script.requests) == 1


def test_once_only_writes_are_not_retried_after_a_read_timeout() -> None:
    script = Script(httpx.ReadTimeout("slow"), ok())
    with pytest.raises(APITimeoutError) as info:
        script.client().register_adapter("a", "/src")
    assert len(script.requests) == 1
    assert "timed out" in info.value.message
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_adapter("a"),
        lambda c: c.set_current("a", 2),
        lambda c: c.pin("a"),
        lambda c: c.set_alias("b", {"a": 1}),
        lambda c: c.warm("a"),
        lambda c: c.chat("tiny", HI),
        lambda c: c.set_access("a", owner="t"),
        lambda c: c.put_tenant("t", max_concurrent=1),
        lambda c: c.get_tenant("t"),
    ],
)
def test_replayable_calls_are_retried_after_ambiguous_failures(
    call: Callable[[Client], Any],
) -> None:
    script = Script(httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("reset"), error(502), ok())
    call(script.client(max_retries=3))
    assert len(script.requests) == 4
    assert script.bodies[0] == script.bodies[-1]


def test_connection_errors_become_api_connection_errors() -> None:
    script = Script(*(httpx.ConnectError("refused") for _ in range(3)))
    with pytest.raises(APIConnectionError) as info:
        script.client().list_adapters()
    assert not isinstance(info.value, APITimeoutError)
    assert info.value.message.startswith("cannot talk to http://srv/admin/adapters")
    assert info.value.status is None and info.value.request_id is not None
    assert len(script.sleeps) == 2


def test_a_retried_upload_sends_the_whole_files_again(tmp_path: Path) -> None:
    folder = make_adapter(tmp_path / "a")
    progress: list[tuple[int, int]] = []
    script = Script(error(429), ok())
    script.client().upload_adapter(
        "a", folder, sha256="f" * 64, progress=lambda s, t: progress.append((s, t))
    )
    assert len(script.requests) == 2
    assert script.bodies[0].split(b"\r\n")[1:] == script.bodies[1].split(b"\r\n")[1:]
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert weights in script.bodies[1]
    assert b'name="sha256"' in script.bodies[1] and b"f" * 64 in script.bodies[1]
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert script.requests[1].headers["content-length"] == str(len(script.bodies[1]))
    config = (folder / "adapter_config.json").stat().st_size
    attempt = [(0, total), (config, total), (total, total)]
    assert progress == attempt + attempt  # back to zero for the retry


async def test_async_client_retries_with_its_own_sleep() -> None:
    script = Script(error(503, headers={"retry-after": "2"}), error(429), ok())
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with AsyncClient("http://srv", admin_key="k", transport=script, sleep=sleep) as client:
        assert (await client.get_adapter("a"))["name"] == "a"
        script.replies = [error(503)]
        with pytest.raises(ServiceUnavailableError):
            await client.delete_adapter("a")
    assert slept[0] == 2.0 and 0.5 <= slept[1] <= 1.0
    assert len(slept) == 2


# -- requests --------------------------------------------------------------------------


def test_requests_on_the_wire() -> None:
    script = Script(ok({"choices": [{"message": {"content": "x"}}]}), ok({"data": []}), ok())
    client = Client("http://srv/", api_key="user-key", transport=script)
    client.chat("tiny:a", HI, temperature=0, user="u1")
    client.models()
    client.set_alias("a b/c", {"x@2": 3})
    chat, models, alias = script.requests
    assert (chat.method, str(chat.url)) == ("POST", "http://srv/v1/chat/completions")
    assert json.loads(script.bodies[0]) == {
        "model": "tiny:a",
        "messages": HI,
        "temperature": 0,
        "user": "u1",
        "stream": False,
    }
    assert chat.headers["authorization"] == "Bearer user-key"
    assert models.url.path == "/v1/models"
    assert alias.url.raw_path == b"/admin/aliases/a%20b%2Fc"
    assert "authorization" not in alias.headers  # no admin key given: the server says 401
    assert json.loads(script.bodies[2]) == {"variants": {"x@2": 3}}


def test_tenant_and_access_requests_on_the_wire(tmp_path: Path) -> None:
    replies = [ok({"data": []}) if i == 3 else ok() for i in range(12)]
    script = Script(*replies)
    client = script.client()
    client.register_adapter("a", "/src", owner="t", shared=True)
    client.register_adapter("b", "/src")
    client.set_alias("x", {"a": 1}, owner="t", shared=True)
    client.list_tenants()
    client.put_tenant("t/1", tokens_per_minute=600)
    client.get_tenant("t")
    client.delete_tenant("t")
    client.create_key("t")
    client.delete_key("t", "abc/def")
    client.set_access("a", "t")
    client.upload_adapter("u", make_adapter(tmp_path / "u"), owner="t", shared=True)
    client.upload_adapter("v", make_adapter(tmp_path / "v"))
    sent = [(r.method, r.url.raw_path.decode()) for r in script.requests]
    assert sent == [
        ("POST", "/admin/adapters"),
        ("POST", "/admin/adapters"),
        ("PUT", "/admin/aliases/x"),
        ("GET", "/admin/tenants"),
        ("PUT", "/admin/tenants/t%2F1"),
        ("GET", "/admin/tenants/t"),
        ("DELETE", "/admin/tenants/t"),
        ("POST", "/admin/tenants/t/keys"),
        ("DELETE", "/admin/tenants/t/keys/abc%2Fdef"),
        ("PUT", "/admin/adapters/a/access"),
        ("POST", "/admin/adapters/upload"),
        ("POST", "/admin/adapters/upload"),
    ]
    bodies = [json.loads(b) if b.startswith(b"{") else b for b in script.bodies]
    assert bodies[0] == {
        "name": "a",
        "source": "/src",
        "sha256": None,
        "owner": "t",
        "shared": True,
    }
    # The defaults are not sent: the same bodies as for a server without tenants.
    assert bodies[1] == {"name": "b", "source": "/src", "sha256": None}
    assert bodies[2] == {"variants": {"a": 1}, "owner": "t", "shared": True}
    assert bodies[4] == {"max_concurrent": None, "tokens_per_minute": 600}
    assert script.bodies[7] == b""
    assert bodies[9] == {"owner": "t", "shared": False}
    upload, plain = script.bodies[10], script.bodies[11]
    assert b'name="owner"\r\n\r\nt\r\n' in upload and b'name="shared"\r\n\r\ntrue\r\n' in upload
    assert b'name="owner"' not in plain and b'name="shared"' not in plain
    assert all(h["authorization"] == "Bearer k" for h in script.headers)


def test_inference_params_cannot_smuggle_stream() -> None:
    client = Script().client()
    with pytest.raises(TypeError, match="_stream"):
        client.chat("m", HI, stream=True)
    with pytest.raises(TypeError, match="_stream"):
        client.completions("m", "p", stream=False)
    assert Script().requests == []


def test_constructor_checks() -> None:
    with pytest.raises(TypeError, match=r"httpx\.Client"):
        Client(http_client=httpx.AsyncClient())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        Client(transport=Script(), http_client=httpx.Client())
    with pytest.raises(ValueError, match="max_retries"):
        Client(max_retries=-1)


def test_names_are_escaped_into_one_segment() -> None:
    assert segment("pirate.v2") == "pirate.v2"
    assert segment("../x") == "..%2Fx"
    for bad in ("", ".", ".."):
        with pytest.raises(ValueError, match="invalid name"):
            segment(bad)


# -- errors ----------------------------------------------------------------------------


def test_errors_from_bodies_that_are_not_openai_shaped() -> None:
    script = Script(
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(405, json={"detail": "Method Not Allowed"}),
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.Response(502, text="<html>bad gateway</html>"),
    )
    client = script.client()
    with pytest.raises(NotFoundError, match="Not Found"):
        client.get_adapter("a")
    with pytest.raises(APIStatusError) as other:
        client.get_adapter("a")
    assert type(other.value) is APIStatusError and other.value.status == 405
    with pytest.raises(InternalServerError, match="HTTP 502 Bad Gateway"):
        client.get_adapter("a")


def test_error_fields_and_request_id() -> None:
    body = {
        "error": {"message": "bad t", "type": "invalid_request_error", "param": "t", "code": None}
    }
    script = Script(httpx.Response(400, json=body, headers={"x-request-id": "srv-id"}))
    with pytest.raises(BadRequestError) as info:
        script.client().chat("m", HI)
    e = info.value
    assert (e.status, e.type, e.param, e.code, e.request_id) == (
        400,
        "invalid_request_error",
        "t",
        None,
        "srv-id",
    )
    assert str(e) == "bad t"
    assert isinstance(e, LoraswapError)


@pytest.mark.parametrize(
    ("error_body", "cls", "status"),
    [
        (
            {"type": "service_unavailable_error", "code": "engine_unavailable"},
            ServiceUnavailableError,
            503,
        ),
        ({"type": "invalid_request_error", "code": "source_changed"}, ConflictError, 409),
        (
            {"type": "invalid_request_error", "code": "adapter_malformed"},
            UnprocessableEntityError,
            422,
        ),
        ({"type": "invalid_request_error", "code": "model_not_found"}, NotFoundError, 404),
        ({"type": "server_error", "code": "engine_error"}, InternalServerError, 500),
        ({"type": "rate_limit_error", "code": "rate_limit_exceeded"}, RateLimitError, 429),
        ({"type": "rate_limit_error", "code": None}, RateLimitError, 429),
        (
            {"type": "service_unavailable_error", "code": "server_overloaded"},
            ServiceUnavailableError,
            503,
        ),
        # The one code the server uses with two statuses: the type tells them apart.
        ({"type": "authentication_error", "code": "invalid_api_key"}, AuthenticationError, 401),
        ({"type": "permission_error", "code": "invalid_api_key"}, PermissionDeniedError, 403),
        ({"type": "invalid_request_error", "code": None}, BadRequestError, 400),
        ({"type": "something_new", "code": "new"}, InternalServerError, 500),
    ],
)
def test_stream_error_frames_map_to_the_status_the_server_uses(
    error_body: dict[str, Any], cls: type[APIStatusError], status: int
) -> None:
    exc = stream_error({"message": "m", "param": None, **error_body})
    assert type(exc) is cls and exc.status == status and exc.message == "m"


def test_status_error_without_a_body() -> None:
    exc = status_error(429, None, reason="Too Many Requests")
    assert isinstance(exc, RateLimitError) and exc.message == "HTTP 429 Too Many Requests"


# -- Retry-After parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("5", 5.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("nan", None),
        ("soon", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_date_in_the_future() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 42, usegmt=True), now=now) == 42.0
    assert parse_retry_after(formatdate(now + 42)[:-5] + "-0000", now=now) == 42.0


# -- SSE -------------------------------------------------------------------------------


def sse(*events: str) -> bytes:
    return "".join(f"{e}\n\n" for e in events).encode()


def stream_reply(body: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream", **headers}
    )


def test_sse_decoder_lines() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "event: x", 'data: {"a":', "data: 1}", "", "data:[DONE]", ""]
    out = [decoder.feed(line) for line in lines]
    assert out == [None, None, None, None, {"a": 1}, None, None]
    assert decoder.done
    decoder.finish()


def test_stream_reads_chunks_until_done() -> None:
    body = sse('data: {"n":1}', 'data: {"n":2}', "data: [DONE]", 'data: {"n":3}')
    script = Script(stream_reply(body, **{"x-adapter": "a", "x-adapter-version": "7"}))
    stream = script.client().completions_stream("m", "p")
    assert (stream.served_by.adapter, stream.served_by.adapter_version) == ("a", 7)
    assert [c["n"] for c in stream] == [1, 2]
    assert stream.response.is_closed
    assert json.loads(script.bodies[0])["stream"] is True


def test_stream_cut_short_raises() -> None:
    script = Script(stream_reply(sse('data: {"n":1}')))
    stream = script.client().chat_stream("m", HI)
    chunks: list[Any] = []
    with pytest.raises(APIConnectionError, match=r"before data: \[DONE\]"):
        chunks.extend(stream)
    assert chunks == [{"n": 1}]


def test_stream_error_frame_raises_typed_error() -> None:
    frame = json.dumps(
        {
            "error": {
                "message": "changed",
                "type": "invalid_request_error",
                "param": None,
                "code": "source_changed",
            }
        }
    )
    script = Script(
        stream_reply(
            sse('data: {"n":1}', f"data: {frame}", "data: [DONE]"), **{"x-request-id": "rid"}
        )
    )
    with pytest.raises(ConflictError) as info:
        list(script.client().chat_stream("m", HI))
    assert (info.value.code, info.value.request_id) == ("source_changed", "rid")


def test_stream_that_fails_before_its_first_byte_is_retried_then_raises() -> None:
    script = Script(error(503), error(404, "model_not_found"))
    with pytest.raises(NotFoundError):
        script.client().chat_stream("m", HI)
    assert len(script.requests) == 2


def test_stream_transport_failure_mid_way() -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b'data: {"n":1}\n\n'
            raise httpx.ReadError("reset")

    script = Script(httpx.Response(200, stream=Broken()))
    stream = script.client().chat_stream("m", HI)
    with pytest.raises(APIConnectionError, match="ReadError"):
        list(stream)
