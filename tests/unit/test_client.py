"""The Python clients and the admin CLI against the REAL FastAPI app, in-process, with the
fake engine: wire compatibility is what these tests prove (the clients never import the
server). Retry and parsing details are in test_client_retry.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI
from typer.testing import CliRunner

from clients import (
    JSON,
    AdapterInfo,
    AliasInfo,
    APIStatusError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    DeletedAdapter,
    DeletedKey,
    DeletedTenant,
    InternalServerError,
    ModelInfo,
    NewApiKey,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    TenantInfo,
    UnprocessableEntityError,
    VersionInfo,
    VersionState,
    WarmedAdapter,
)
from server.app import create_app
from server.cli import app as loraswap
from server.cli.options import client_factory
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine, chat_prompt_ids, reply

ADMIN_KEY = "admin-s3cret"
URL = "http://testserver"
HI = [{"role": "user", "content": "hi"}]


class Server:
    """The app with a fake engine, its allowed root, and sleeps recorded instead of slept."""

    def __init__(self, tmp_path: Path, engine: FakeEngine | None = None, **settings: Any) -> None:
        self.root = tmp_path / "allowed"
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = engine or FakeEngine()
        self.sleeps: list[float] = []
        self.app: FastAPI = create_app(
            Settings(
                served_model_name="tiny",
                model=make_base(tmp_path / "base"),
                home=tmp_path / "home",
                admin_key=ADMIN_KEY,
                allowed_roots=[self.root],
                **settings,
            ),
            engine=self.engine,
        )

    def adapter(self, name: str, **kwargs: Any) -> Path:
        """A PEFT folder inside the allowed root."""
        return make_adapter(self.root / name, **kwargs)

    @contextmanager
    def running(self) -> Iterator[httpx.BaseTransport]:
        """The app started (lifespan) on an event loop in a thread, and a sync transport to it."""
        with (
            start_blocking_portal() as portal,
            portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app)),
        ):
            yield PortalTransport(self.app, portal)


class PortalTransport(httpx.BaseTransport):
    """A sync httpx transport into the ASGI app, run on the portal's event loop.

    Not starlette's TestClient: that one is built on another package (httpx2), and the
    client under test must see real httpx requests, responses and errors.
    """

    def __init__(self, app: FastAPI, portal: BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return self._portal.call(call)


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path)


@pytest.fixture
def transport(server: Server) -> Iterator[httpx.BaseTransport]:
    with server.running() as transport:
        yield transport


@pytest.fixture
def client(server: Server, transport: httpx.BaseTransport) -> Iterator[Client]:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport, sleep=server.sleeps.append) as c:
        yield c


def keys(typed_dict: Any) -> set[str]:
    return set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)


# -- inference -------------------------------------------------------------------------


def test_chat_and_what_served_it(client: Client, server: Server) -> None:
    client.register_adapter("pirate", str(server.adapter("p1", seed=1)))
    answer = client.chat("tiny:pirate", HI, max_tokens=8, temperature=0)
    assert answer.text == reply("pirate@1", 8)
    assert answer.body["object"] == "chat.completion"
    assert answer.body["model"] == "tiny:pirate"
    served = answer.served_by
    assert (served.adapter, served.adapter_version, served.alias) == ("pirate", 1, None)
    assert served.request_id and len(served.request_id) == 32  # the id the client sent

    base = client.chat("tiny", HI, max_tokens=4)
    assert base.text == reply(None, 4)
    assert (base.served_by.adapter, base.served_by.adapter_version) == (None, None)


def test_completions_text_and_token_ids(client: Client) -> None:
    answer = client.completions("tiny", "hello", max_tokens=3)
    assert answer.body["object"] == "text_completion"
    assert answer.text == reply(None, 3)
    ids = client.completions("tiny", [104, 105], max_tokens=2, return_token_ids=True)
    assert ids.body["choices"][0]["prompt_token_ids"] == [104, 105]
    assert ids.text == reply(None, 2)


def test_chat_stream_matches_the_whole_reply(client: Client, server: Server) -> None:
    client.register_adapter("pirate", str(server.adapter("p1", seed=1)))
    whole = client.chat("pirate", HI, max_tokens=12).text
    with client.chat_stream(
        "pirate", HI, max_tokens=12, stream_options={"include_usage": True}
    ) as stream:
        assert stream.served_by.adapter == "pirate"  # known before the first chunk
        assert stream.served_by.adapter_version == 1
        chunks = list(stream)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole == reply("pirate@1", 12)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_completions_stream(client: Client) -> None:
    chunks = list(client.completions_stream("tiny", "x", max_tokens=5))
    assert "".join(c["choices"][0]["text"] for c in chunks) == reply(None, 5)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _dying_stream(client: Client, server: Server) -> tuple[list[JSON], Any, str | None]:
    """A chat stream during which the engine dies (after the role chunk and a token)."""
    server.engine.die_after_tokens = 1
    stream = client.chat_stream("tiny", HI, max_tokens=50)
    seen: list[JSON] = []
    with pytest.raises(APIStatusError) as info:
        seen.extend(stream)
    return seen, info.value, stream.served_by.request_id


def test_error_frame_in_a_stream_raises_a_typed_error(client: Client, server: Server) -> None:
    seen, error, request_id = _dying_stream(client, server)
    assert [c["choices"][0]["delta"].get("role") for c in seen] == ["assistant", None]
    assert isinstance(error, InternalServerError)  # a 5xx, though the status line said 200
    assert error.request_id == request_id


def test_error_frame_of_a_dead_engine_is_503_engine_unavailable(
    client: Client, server: Server
) -> None:
    _, error, _ = _dying_stream(client, server)
    assert isinstance(error, ServiceUnavailableError)
    assert (error.status, error.code) == (503, "engine_unavailable")


def test_503_is_retried_then_raised(client: Client, server: Server) -> None:
    server.engine.dead = True
    with pytest.raises(ServiceUnavailableError) as info:
        client.chat("tiny", HI, max_tokens=4)
    assert len(server.sleeps) == 2  # max_retries=2: three attempts
    assert info.value.code == "engine_unavailable"
    assert info.value.request_id is not None
    assert info.value.request_id.endswith(".2")  # the last attempt's id


def test_models_lists_base_adapters_and_aliases(client: Client, server: Server) -> None:
    client.register_adapter("pirate", str(server.adapter("p1")))
    client.set_alias("bot", {"pirate": 1})
    models = {m["id"]: m for m in client.models()}
    assert set(models) == {"tiny", "tiny:pirate", "tiny:bot"}
    assert models["tiny:bot"]["kind"] == "alias"
    assert models["tiny:pirate"]["parent"] == "tiny"
    for model in models.values():
        assert set(model) >= ModelInfo.__required_keys__


def test_model_info_names_every_field_the_server_sends(client: Client) -> None:
    for model in client.models():
        assert set(model) <= keys(ModelInfo)


def test_api_key_is_sent_on_inference_and_admin_key_on_admin(
    transport: httpx.BaseTransport,
) -> None:
    seen: list[tuple[str, str | None]] = []

    def record(request: httpx.Request) -> None:
        seen.append((request.url.path, request.headers.get("authorization")))

    # Also: a caller's own httpx client is used as it is (and left open).
    with httpx.Client(transport=transport, event_hooks={"request": [record]}) as http:
        c = Client(URL, api_key="tenant-key", admin_key=ADMIN_KEY, http_client=http)
        c.models()
        c.list_adapters()
        c.close()
        assert not http.is_closed
    assert seen == [
        ("/v1/models", "Bearer tenant-key"),
        ("/admin/adapters", f"Bearer {ADMIN_KEY}"),
    ]


# -- admin -----------------------------------------------------------------------------


def test_every_adapter_call(client: Client, server: Server, tmp_path: Path) -> None:
    adapter = client.register_adapter("pirate", str(server.adapter("p1", seed=1)))
    assert set(adapter) == keys(AdapterInfo)
    assert set(adapter["versions"][0]) == keys(VersionState)
    assert (adapter["name"], adapter["current_version"], adapter["pinned"]) == ("pirate", 1, False)

    v2 = client.add_version("pirate", str(server.adapter("p2", seed=2)))
    assert set(v2) == keys(VersionInfo)
    assert v2["version"] == 2
    assert client.chat("pirate", HI, max_tokens=8).served_by.adapter_version == 2

    staged = client.add_version("pirate", str(server.adapter("p3", seed=3)), make_current=False)
    assert staged["version"] == 3
    assert client.get_adapter("pirate")["current_version"] == 2

    progress: list[tuple[int, int]] = []
    upload = make_adapter(tmp_path / "local" / "p4", seed=4)  # outside the allowed root
    v4 = client.upload_version("pirate", upload, make_current=False, progress=_append(progress))
    assert (v4["version"], v4["source"]) == (4, "upload")
    assert progress[-1][0] == progress[-1][1] == _folder_size(upload)

    assert client.set_current("pirate", 3)["current_version"] == 3
    assert client.chat("pirate", HI, max_tokens=8).text == reply("pirate@3", 8)
    assert client.rollback("pirate", 1)["current_version"] == 1
    assert client.chat("pirate", HI, max_tokens=8).served_by.adapter_version == 1

    assert client.pin("pirate")["pinned"] is True
    assert server.engine.pinned
    assert client.pin("pirate", pinned=False)["pinned"] is False
    warmed = client.warm("pirate")
    assert set(warmed) == keys(WarmedAdapter)
    assert warmed == {"name": "pirate", "loaded": "pirate@1"}
    loaded = {v["version"]: v["loaded"] for v in client.get_adapter("pirate")["versions"]}
    assert loaded[1] is True

    deleted = client.delete_version("pirate", 2)
    assert (deleted["adapter"], deleted["version"]) == ("pirate", 2)
    versions = [v["version"] for v in client.get_adapter("pirate")["versions"]]
    assert versions == [1, 3, 4]

    listed = client.list_adapters()
    assert [a["name"] for a in listed] == ["pirate"]
    gone = client.delete_adapter("pirate")
    assert set(gone) == keys(DeletedAdapter)
    assert gone == {"name": "pirate", "deleted": True}
    assert client.list_adapters() == []


def test_upload_adapter_from_a_folder_and_from_named_files(client: Client, tmp_path: Path) -> None:
    folder = make_adapter(tmp_path / "local" / "up", seed=5)
    calls: list[tuple[int, int]] = []
    adapter = client.upload_adapter("up", folder, progress=_append(calls))
    assert adapter["versions"][0]["source"] == "upload"
    assert calls and calls[-1] == (_folder_size(folder), _folder_size(folder))
    assert [sent for sent, _ in calls] == sorted(sent for sent, _ in calls)

    files: dict[str, str | Path] = {
        "adapter_config": folder / "adapter_config.json",
        "adapter_model": str(folder / "adapter_model.safetensors"),
    }
    adapter = client.upload_adapter("up2", files, sha256=adapter["versions"][0]["sha256"])
    assert adapter["name"] == "up2"
    assert client.chat("up2", HI, max_tokens=5).text == reply("up2@1", 5)


def test_upload_refuses_incomplete_folders_before_sending(client: Client, tmp_path: Path) -> None:
    folder = make_adapter(tmp_path / "local" / "x")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        client.upload_adapter("x", folder)
    with pytest.raises(ValueError, match="adapter_model"):
        client.upload_adapter("x", {"adapter_config": folder / "adapter_config.json"})


def test_every_alias_call(client: Client, server: Server) -> None:
    client.register_adapter("pirate", str(server.adapter("p", seed=1)))
    client.register_adapter("formal", str(server.adapter("f", seed=2)))
    alias = client.set_alias("support-bot", {"pirate@1": 90, "formal": 10})
    assert set(alias) == keys(AliasInfo)
    assert alias["variants"] == {"pirate@1": 90, "formal": 10}
    assert client.get_alias("support-bot")["variants"] == alias["variants"]
    assert [a["name"] for a in client.list_aliases()] == ["support-bot"]

    reply = client.chat("support-bot", HI, max_tokens=8, user="u1")
    assert reply.served_by.alias == "support-bot"
    assert reply.served_by.alias_variant in ("pirate@1", "formal")
    again = client.chat("support-bot", HI, max_tokens=8, user="u1")
    assert again.served_by.alias_variant == reply.served_by.alias_variant  # sticky

    moved = client.set_alias("support-bot", {"formal": 1})
    assert moved["variants"] == {"formal": 1}
    assert client.chat("support-bot", HI, max_tokens=8).served_by.alias_variant == "formal"
    deleted = client.delete_alias("support-bot")
    assert deleted["name"] == "support-bot"
    assert client.list_aliases() == []


# -- typed errors ----------------------------------------------------------------------


def test_typed_errors_carry_the_server_fields(
    client: Client, server: Server, transport: httpx.BaseTransport
) -> None:
    with pytest.raises(BadRequestError) as bad:
        client.chat("tiny", HI, temperature=5)
    assert (bad.value.status, bad.value.param, bad.value.type) == (
        400,
        "temperature",
        "invalid_request_error",
    )
    with pytest.raises(AuthenticationError) as no_key:
        Client(URL, transport=transport).list_adapters()
    assert (no_key.value.status, no_key.value.code) == (401, "missing_api_key")
    with pytest.raises(PermissionDeniedError) as wrong_key:
        Client(URL, admin_key="nope", transport=transport).list_adapters()
    assert wrong_key.value.code == "invalid_api_key"
    with pytest.raises(PermissionDeniedError) as outside:
        client.register_adapter("x", str(server.root / ".." / "elsewhere"))
    assert outside.value.code == "path_outside_roots"
    with pytest.raises(NotFoundError) as missing:
        client.get_adapter("nobody")
    assert (missing.value.status, missing.value.code) == (404, "model_not_found")
    with pytest.raises(NotFoundError):
        client.chat("tiny:nobody", HI)

    client.register_adapter("a", str(server.adapter("a")))
    with pytest.raises(ConflictError) as taken:
        client.register_adapter("a", str(server.adapter("a")))
    assert taken.value.code == "already_exists"
    client.set_alias("bot", {"a": 1})
    with pytest.raises(ConflictError) as in_use:
        client.delete_adapter("a")
    assert in_use.value.code == "in_use"

    with pytest.raises(UnprocessableEntityError) as rank:
        client.register_adapter("big", str(server.adapter("big", rank=64)))
    assert rank.value.code == "adapter_rank_too_large"
    with pytest.raises(UnprocessableEntityError) as alias:
        client.set_alias("bad", {"a@x": 1})
    assert alias.value.code == "invalid_alias"
    with pytest.raises(UnprocessableEntityError) as name:
        client.register_adapter("Bad_Name", str(server.adapter("a")))
    assert name.value.code == "invalid_adapter_name"
    assert str(name.value).endswith("(invalid_adapter_name)")
    assert server.sleeps == []  # none of these is retried


def test_payload_too_large(tmp_path: Path) -> None:
    server = Server(tmp_path, max_adapter_bytes=64)
    with server.running() as transport:
        client = Client(URL, admin_key=ADMIN_KEY, transport=transport)
        with pytest.raises(PayloadTooLargeError) as info:
            client.register_adapter("a", str(server.adapter("a")))
    assert (info.value.status, info.value.code) == (413, "adapter_too_large")


def test_names_are_one_path_segment(client: Client) -> None:
    with pytest.raises(NotFoundError):  # not /admin/aliases (a list): an adapter named so
        client.get_adapter("../aliases")
    with pytest.raises(ValueError, match="invalid name"):
        client.get_adapter("..")


# -- the async client ------------------------------------------------------------------


async def test_async_client_end_to_end(server: Server, tmp_path: Path) -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = httpx.ASGITransport(app=server.app)
    async with (
        server.app.router.lifespan_context(server.app),
        AsyncClient(URL, admin_key=ADMIN_KEY, transport=transport, sleep=sleep) as client,
    ):
        registered = await client.register_adapter("pirate", str(server.adapter("p", seed=1)))
        assert registered["current_version"] == 1
        uploaded = await client.upload_version(
            "pirate", make_adapter(tmp_path / "local" / "p2", seed=2)
        )
        assert uploaded["version"] == 2
        answer = await client.chat("tiny:pirate", HI, max_tokens=8)
        assert (answer.text, answer.served_by.adapter_version) == (reply("pirate@2", 8), 2)

        stream = await client.chat_stream("pirate", HI, max_tokens=8)
        assert stream.served_by.adapter == "pirate"
        chunks = [c async for c in stream]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == reply("pirate@2", 8)
        text_chunks = [c async for c in await client.completions_stream("tiny", "x", max_tokens=3)]
        assert "".join(c["choices"][0]["text"] for c in text_chunks) == reply(None, 3)

        await client.set_alias("bot", {"pirate@1": 1})
        assert (await client.chat("bot", HI, max_tokens=8)).text == reply("pirate@1", 8)
        assert [a["name"] for a in await client.list_aliases()] == ["bot"]
        await client.delete_alias("bot")
        assert [m["id"] for m in await client.models()] == ["tiny", "tiny:pirate"]

        with pytest.raises(NotFoundError):
            await client.rollback("pirate", 9)
        server.engine.dead = True
        with pytest.raises(ServiceUnavailableError):
            await client.completions("tiny", "x", max_tokens=2)
        assert len(sleeps) == 2


# -- the admin CLI ---------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def cli(transport: httpx.BaseTransport) -> Callable[..., Any]:
    """Run `loraswap <args>` (the real command) on a client of the in-process app."""

    def connect(url: str, admin_key: str | None) -> Client:
        assert url == URL  # from LORASWAP_URL
        return Client(url, admin_key=admin_key, transport=transport, sleep=lambda _: None)

    env = {"LORASWAP_URL": URL, "LORASWAP_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "200"}

    def run(*args: str, code: int = 0, input: str | None = None) -> Any:
        with client_factory(connect):
            result = runner.invoke(loraswap, list(args), env=env, input=input)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return run


def test_cli_adapter_lifecycle(
    cli: Callable[..., Any], server: Server, client: Client, tmp_path: Path
) -> None:
    out = cli("adapters", "register", "pirate", str(server.adapter("p1", seed=1))).stdout
    assert out.startswith("registered pirate v1 (rank 8")
    out = cli("adapters", "add-version", "pirate", str(server.adapter("p2", seed=2))).stdout
    assert "added pirate v2" in out and "(current)" in out
    local = make_adapter(tmp_path / "local" / "p3", seed=3)
    out = cli("adapters", "add-version", "pirate", str(local), "--upload", "--stage").stdout
    assert "added pirate v3" in out and "(staged)" in out
    out = cli("adapters", "upload", "formal", str(make_adapter(tmp_path / "local" / "f"))).stdout
    assert out.startswith("uploaded formal v1")

    table = cli("adapters", "list").stdout
    assert "pirate" in table and "formal" in table
    listed = cli("adapters", "list", "--json").stdout
    assert '"current_version": 2' in listed

    assert "current version is now 3" in cli("adapters", "set-current", "pirate", "3").stdout
    assert client.get_adapter("pirate")["current_version"] == 3
    assert "current version is now 1" in cli("adapters", "rollback", "pirate", "1").stdout
    assert client.chat("pirate", HI, max_tokens=8).text == reply("pirate@1", 8)

    assert cli("adapters", "pin", "pirate").stdout.strip() == "pinned pirate"
    assert client.get_adapter("pirate")["pinned"] is True
    assert cli("adapters", "unpin", "pirate").stdout.strip() == "unpinned pirate"
    assert "pirate@1 loaded" in cli("adapters", "warm", "pirate").stdout
    show = cli("adapters", "show", "pirate").stdout
    assert show.startswith("pirate: current version 1")
    assert "upload" in show and "1 *" in show

    cli("adapters", "delete-version", "pirate", "2", "--yes")
    assert [v["version"] for v in client.get_adapter("pirate")["versions"]] == [1, 3]
    cli("adapters", "delete", "formal", input="n\n", code=1)  # declined at the prompt
    assert client.get_adapter("formal")
    assert "deleted adapter formal" in cli("adapters", "delete", "formal", input="y\n").stdout
    with pytest.raises(NotFoundError):
        client.get_adapter("formal")


def test_cli_aliases(cli: Callable[..., Any], server: Server, client: Client) -> None:
    client.register_adapter("pirate", str(server.adapter("p", seed=1)))
    client.register_adapter("formal", str(server.adapter("f", seed=2)))
    out = cli("aliases", "set", "bot", "pirate@1=90", "formal=10").stdout
    assert out.strip() == "bot: pirate@1=90 (90%), formal=10 (10%); owner: the operator, private"
    assert client.get_alias("bot")["variants"] == {"pirate@1": 90, "formal": 10}
    assert "pirate@1=90" in cli("aliases", "list").stdout
    assert '"formal": 10' in cli("aliases", "show", "bot", "--json").stdout
    cli("aliases", "set", "bot", "pirate=x", code=2)  # a usage error, nothing sent
    assert cli("aliases", "delete", "bot", "-y").stdout.strip() == "deleted alias bot"
    assert client.list_aliases() == []


def test_cli_errors_are_one_line_and_exit_1(
    cli: Callable[..., Any], server: Server, tmp_path: Path
) -> None:
    result = cli("adapters", "show", "nobody", code=1)
    assert result.stderr.strip() == "error: adapter 'nobody' not found (model_not_found)"
    assert result.stdout == ""
    result = cli("adapters", "register", "x", str(server.root / "missing"), code=1)
    assert result.stderr.count("\n") == 1 and "(invalid_source)" in result.stderr
    result = cli("aliases", "set", "bot", "nobody=1", code=1)
    assert result.stderr.startswith("error: ")
    result = cli("adapters", "upload", "x", str(tmp_path / "nowhere"), code=1)
    assert "is not a folder" in result.stderr
    result = cli("adapters", "list", "--admin-key", "wrong", code=1)
    assert result.stderr.strip() == "error: admin API: wrong admin key (invalid_api_key)"


def test_cli_connection_failure_is_one_line() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def connect(url: str, admin_key: str | None) -> Client:
        return Client(url, transport=httpx.MockTransport(refuse), sleep=lambda _: None)

    with client_factory(connect):
        result = runner.invoke(
            loraswap, ["adapters", "list", "--url", "http://127.0.0.1:9"], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot talk to http://127.0.0.1:9/admin/adapters")
    assert result.stderr.count("\n") == 1


# -- helpers ---------------------------------------------------------------------------


def _append(calls: list[tuple[int, int]]) -> Callable[[int, int], None]:
    return lambda sent, total: calls.append((sent, total))


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_sync_and_async_clients_offer_the_same_calls() -> None:
    public = {n for n in dir(Client) if not n.startswith("_")} - {"close"}
    assert public == {n for n in dir(AsyncClient) if not n.startswith("_")} - {"close"}
    assert {"chat", "chat_stream", "upload_adapter", "set_alias", "rollback"} <= public
    assert {
        "put_tenant",
        "list_tenants",
        "get_tenant",
        "delete_tenant",
        "create_key",
        "delete_key",
        "set_access",
    } <= public
    assert asyncio.iscoroutinefunction(AsyncClient.close)


# -- tenants, API keys, access ---------------------------------------------------------


def _tenant_client(transport: httpx.BaseTransport, key: str | None, **kwargs: Any) -> Client:
    return Client(URL, api_key=key, transport=transport, sleep=lambda _: None, **kwargs)


def test_every_tenant_call(client: Client, server: Server, transport: httpx.BaseTransport) -> None:
    acme = client.put_tenant("acme", max_concurrent=2)
    assert set(acme) == keys(TenantInfo)
    assert (acme["name"], acme["max_concurrent"], acme["tokens_per_minute"]) == ("acme", 2, None)
    assert (acme["key_ids"], acme["running"]) == ([], 0)
    changed = client.put_tenant("acme", max_concurrent=3, tokens_per_minute=1000)
    assert (changed["max_concurrent"], changed["tokens_per_minute"]) == (3, 1000)
    assert changed["created_at"] == acme["created_at"]
    client.put_tenant("beta")
    assert [t["name"] for t in client.list_tenants()] == ["acme", "beta"]
    assert client.get_tenant("beta")["max_concurrent"] is None

    created = client.create_key("acme")
    assert set(created) == keys(NewApiKey)
    assert created["tenant"] == "acme"
    assert created["key"].startswith(f"lsk_{created['key_id']}_")
    assert client.get_tenant("acme")["key_ids"] == [created["key_id"]]
    spare = client.create_key("acme")

    # The new key works on /v1; once a key exists, inference needs one.
    answer = _tenant_client(transport, created["key"]).chat("tiny", HI, max_tokens=4)
    assert answer.text == reply(None, 4)
    with pytest.raises(AuthenticationError) as missing:
        _tenant_client(transport, None).chat("tiny", HI, max_tokens=4)
    assert (missing.value.status, missing.value.code) == (401, "missing_api_key")

    revoked = client.delete_key("acme", created["key_id"])
    assert set(revoked) == keys(DeletedKey)
    assert revoked == {"tenant": "acme", "key_id": created["key_id"], "deleted": True}
    assert client.get_tenant("acme")["key_ids"] == [spare["key_id"]]
    with pytest.raises(AuthenticationError) as invalid:
        _tenant_client(transport, created["key"]).chat("tiny", HI, max_tokens=4)
    assert (invalid.value.status, invalid.value.code) == (401, "invalid_api_key")
    with pytest.raises(NotFoundError):
        client.delete_key("acme", created["key_id"])
    with pytest.raises(NotFoundError):
        client.create_key("nobody")

    client.register_adapter("owned", str(server.adapter("o")), owner="acme")
    with pytest.raises(ConflictError) as owns:
        client.delete_tenant("acme")
    assert owns.value.code == "in_use"
    client.set_access("owned")  # back to the operator
    gone = client.delete_tenant("acme")
    assert set(gone) == keys(DeletedTenant)
    assert gone == {"name": "acme", "deleted": True}
    with pytest.raises(NotFoundError):
        client.get_tenant("acme")
    assert [t["name"] for t in client.list_tenants()] == ["beta"]


def test_changing_quotas_keeps_the_keys(client: Client) -> None:
    client.put_tenant("acme")
    key_id = client.create_key("acme")["key_id"]
    client.put_tenant("acme", max_concurrent=3)
    assert client.get_tenant("acme")["key_ids"] == [key_id]


def test_owner_and_shared(client: Client, server: Server, transport: httpx.BaseTransport) -> None:
    tenant = {}
    for name in ("a", "b"):
        client.put_tenant(name)
        tenant[name] = _tenant_client(transport, client.create_key(name)["key"])

    private = client.register_adapter("a-private", str(server.adapter("ap", seed=1)), owner="a")
    assert (private["owner"], private["shared"]) == ("a", False)
    common = client.upload_adapter("common", server.adapter("c", seed=2), shared=True)
    assert (common["owner"], common["shared"]) == (None, True)
    alias = client.set_alias("a-bot", {"a-private": 1}, owner="a")
    assert set(alias) == keys(AliasInfo)
    assert (alias["owner"], alias["shared"]) == ("a", False)
    shared_alias = client.set_alias("everyone", {"common": 1}, shared=True)
    assert (shared_alias["owner"], shared_alias["shared"]) == (None, True)
    with pytest.raises(UnprocessableEntityError) as leak:  # a way into a's adapter for all
        client.set_alias("sneaky", {"a-private": 1}, shared=True)
    assert leak.value.code == "invalid_alias"

    assert tenant["a"].chat("a-private", HI, max_tokens=9).text == reply("a-private@1", 9)
    assert tenant["a"].chat("a-bot", HI, max_tokens=9).served_by.alias == "a-bot"
    for who in ("a", "b"):
        assert tenant[who].chat("tiny:common", HI, max_tokens=6).text == reply("common@1", 6)
        assert tenant[who].chat("everyone", HI, max_tokens=6).text == reply("common@1", 6)
    for model in ("a-private", "tiny:a-private", "a-bot"):
        with pytest.raises(NotFoundError):
            tenant["b"].chat(model, HI, max_tokens=4)
    assert {m["id"] for m in tenant["b"].models()} == {"tiny", "tiny:common", "tiny:everyone"}

    moved = client.set_access("a-private", owner="a", shared=True)
    assert (moved["owner"], moved["shared"]) == ("a", True)
    assert tenant["b"].chat("a-private", HI, max_tokens=9).text == reply("a-private@1", 9)
    moved = client.set_access("a-private", owner="b")
    assert (moved["owner"], moved["shared"]) == ("b", False)
    assert tenant["b"].chat("a-private", HI, max_tokens=9).text == reply("a-private@1", 9)
    with pytest.raises(NotFoundError):
        tenant["a"].chat("a-private", HI, max_tokens=4)
    with pytest.raises(NotFoundError):
        client.set_access("a-private", owner="nobody")
    with pytest.raises(NotFoundError):
        client.register_adapter("x", str(server.adapter("x")), owner="nobody")
    assert server.sleeps == []


def test_another_tenants_adapter_is_a_404_like_a_missing_one(
    client: Client, server: Server, transport: httpx.BaseTransport
) -> None:
    for name in ("a", "b"):
        client.put_tenant(name)
    b = _tenant_client(transport, client.create_key("b")["key"])
    client.register_adapter("secret", str(server.adapter("s")), owner="a")

    def refusal() -> tuple[object, ...]:
        with pytest.raises(NotFoundError) as info:
            b.chat("tiny:secret", HI, max_tokens=4)
        e = info.value
        return (type(e), e.status, e.type, e.param, e.code, e.message, e.retry_after)

    hidden = refusal()
    client.delete_adapter("secret")
    assert refusal() == hidden  # the same answer, field for field, once it is really gone
    assert hidden[4:6] == ("model_not_found", "The model 'tiny:secret' does not exist")


class GatedEngine(FakeEngine):
    """A fake engine whose requests wait at a gate: they stay running until it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def on_generate(self, request_id: str) -> None:
        self.started.set()
        await self.gate.wait()


async def test_max_concurrent_is_a_rate_limit_error_retried_after_retry_after(
    tmp_path: Path,
) -> None:
    engine = GatedEngine()
    server = Server(tmp_path, engine=engine)
    transport = httpx.ASGITransport(app=server.app)
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async with (
        server.app.router.lifespan_context(server.app),
        AsyncClient(URL, admin_key=ADMIN_KEY, transport=transport) as admin,
    ):
        assert (await admin.put_tenant("a", max_concurrent=1))["max_concurrent"] == 1
        key = (await admin.create_key("a"))["key"]
        tenant = AsyncClient(URL, api_key=key, transport=transport, sleep=record)
        first = asyncio.create_task(tenant.chat("tiny", HI, max_tokens=4))
        await engine.started.wait()
        assert (await admin.get_tenant("a"))["running"] == 1

        with pytest.raises(RateLimitError) as info:
            await tenant.chat("tiny", HI, max_tokens=4)
        e = info.value
        assert (e.status, e.type, e.code) == (429, "rate_limit_error", "rate_limit_exceeded")
        assert e.retry_after == 1.0
        assert "already has 1 requests running" in e.message
        assert sleeps == [1.0, 1.0]  # both retries waited what Retry-After said

        # A retry after the wait succeeds once the running request is done.
        async def finish_first(seconds: float) -> None:
            sleeps.append(seconds)
            engine.gate.set()
            await first

        patient = AsyncClient(URL, api_key=key, transport=transport, sleep=finish_first)
        assert (await patient.chat("tiny", HI, max_tokens=4)).text == reply(None, 4)
        assert sleeps == [1.0, 1.0, 1.0]
        assert (await first).text == reply(None, 4)
        await tenant.close()
        await patient.close()


def test_tokens_per_minute_is_a_rate_limit_error_with_retry_after(
    client: Client, transport: httpx.BaseTransport
) -> None:
    # 60 tokens per minute: one per second. A chat of "hi" with max_tokens=8 is `used`.
    used = len(chat_prompt_ids(HI)) + 8
    assert 30 < used <= 60
    wait = used - (60 - used)  # seconds until the bucket holds `used` again
    client.put_tenant("a", tokens_per_minute=60)
    sleeps: list[float] = []
    key = client.create_key("a")["key"]
    tenant = Client(URL, api_key=key, transport=transport, sleep=sleeps.append)
    assert tenant.chat("tiny", HI, max_tokens=8).text == reply(None, 8)
    with pytest.raises(RateLimitError) as info:
        tenant.chat("tiny", HI, max_tokens=8)
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.retry_after is not None and wait - 2 <= info.value.retry_after <= wait
    assert len(sleeps) == 2 and all(wait - 2 <= s <= wait for s in sleeps)
    operator = _tenant_client(transport, ADMIN_KEY)  # the admin key also works on /v1
    assert operator.chat("tiny", HI, max_tokens=8).text == reply(None, 8)  # and no quota


# -- the tenants CLI -------------------------------------------------------------------


def test_cli_tenants(
    cli: Callable[..., Any], client: Client, transport: httpx.BaseTransport
) -> None:
    out = cli("tenants", "create", "acme", "--max-concurrent", "4").stdout
    assert out.strip() == "created tenant acme: max concurrent 4, tokens/minute no limit"
    result = cli("tenants", "create", "acme", code=1)
    assert "already exists" in result.stderr
    assert client.get_tenant("acme")["max_concurrent"] == 4

    out = cli("tenants", "update", "acme", "--tokens-per-minute", "900").stdout
    assert out.strip() == "updated tenant acme: max concurrent 4, tokens/minute 900"
    out = cli("tenants", "update", "acme", "--max-concurrent", "0").stdout  # 0: no limit
    assert "max concurrent no limit, tokens/minute 900" in out
    tenant = client.get_tenant("acme")
    assert (tenant["max_concurrent"], tenant["tokens_per_minute"]) == (None, 900)
    cli("tenants", "update", "acme", code=2)  # nothing to change: a usage error
    assert "not found" in cli("tenants", "update", "nobody", "--max-concurrent", "1", code=1).stderr

    result = cli("tenants", "key-create", "acme")
    key = result.stdout.strip()  # the key alone on stdout
    key_id = client.get_tenant("acme")["key_ids"][0]
    assert key.startswith(f"lsk_{key_id}_")
    assert "shown only this once and cannot be shown again" in result.stderr
    assert _tenant_client(transport, key).chat("tiny", HI, max_tokens=4).text == reply(None, 4)
    as_json = cli("tenants", "key-create", "acme", "--json").stdout
    assert '"tenant": "acme"' in as_json and '"key": "lsk_' in as_json

    listed = cli("tenants", "list").stdout
    assert "acme" in listed and key_id in listed and "900" in listed
    assert '"tokens_per_minute": 900' in cli("tenants", "list", "--json").stdout
    show = cli("tenants", "show", "acme").stdout
    assert show.startswith("acme: max concurrent no limit, tokens/minute 900, 0 running")
    assert key_id in show

    cli("tenants", "key-delete", "acme", key_id, input="n\n", code=1)  # declined
    assert key_id in client.get_tenant("acme")["key_ids"]
    out = cli("tenants", "key-delete", "acme", key_id, "--yes").stdout
    assert out.strip() == f"revoked key {key_id} of tenant acme"
    with pytest.raises(AuthenticationError):
        _tenant_client(transport, key).chat("tiny", HI, max_tokens=4)

    assert cli("tenants", "delete", "acme", "-y").stdout.strip() == "deleted tenant acme"
    assert client.list_tenants() == []
    result = cli("tenants", "show", "acme", code=1)
    assert result.stderr.strip() == "error: tenant 'acme' not found (model_not_found)"


def test_cli_access(
    cli: Callable[..., Any], client: Client, server: Server, tmp_path: Path
) -> None:
    client.put_tenant("a")
    client.put_tenant("b")
    out = cli("adapters", "register", "p", str(server.adapter("p")), "--owner", "a").stdout
    assert out.startswith("registered p v1") and out.strip().endswith("owner a, private")
    folder = str(make_adapter(tmp_path / "local" / "c"))
    out = cli("adapters", "upload", "c", folder, "--shared").stdout
    assert out.strip().endswith("owner: the operator, shared with every tenant")
    assert (client.get_adapter("c")["owner"], client.get_adapter("c")["shared"]) == (None, True)

    assert cli("adapters", "access", "p").stdout.strip() == "p: owner a, private"  # shows
    out = cli("adapters", "access", "p", "--shared").stdout  # the owner stays
    assert out.strip() == "p: owner a, shared with every tenant"
    out = cli("adapters", "access", "p", "--owner", "b").stdout  # sharing stays
    assert out.strip() == "p: owner b, shared with every tenant"
    out = cli("adapters", "access", "p", "--operator", "--private").stdout
    assert out.strip() == "p: owner: the operator, private"
    adapter = client.get_adapter("p")
    assert (adapter["owner"], adapter["shared"]) == (None, False)
    cli("adapters", "access", "p", "--owner", "a", "--operator", code=2)
    assert "not found" in cli("adapters", "access", "p", "--owner", "nobody", code=1).stderr
    show = cli("adapters", "show", "c").stdout
    assert show.startswith("c: current version 1, owner: the operator, shared with every tenant")
    table = cli("adapters", "list").stdout
    assert "owner" in table and "shared" in table

    out = cli("aliases", "set", "bot", "c=1", "--owner", "b").stdout
    assert out.strip() == "bot: c=1 (100%); owner b, private"
    out = cli("aliases", "set", "all", "c=1", "--shared").stdout
    assert out.strip().endswith("owner: the operator, shared with every tenant")
    assert (client.get_alias("bot")["owner"], client.get_alias("all")["shared"]) == ("b", True)
    assert "owner b, private" in cli("aliases", "show", "bot").stdout
    result = cli("aliases", "set", "leak", "p=1", "--shared", code=1)  # p is private
    assert "(invalid_alias)" in result.stderr
