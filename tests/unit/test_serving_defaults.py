"""Per-version serving defaults (issue 16 item 5), through the HTTP API, on a fake engine
(fast) and each registry backend (conftest.py): what is registered, what is refused,
what a request gets, and which header says so."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clients import BadRequestError, Client, ServingDefaults
from server.app import create_app
from server.cli import app as loraswap
from server.cli.options import client_factory
from server.serving import DEFAULTS_HEADER
from tests.adapters import make_adapter
from tests.databases import registry_settings
from tests.fakes import FakeEngine, chat_prompt_ids, prompt_ids
from tests.testclient import ClientResponse
from tests.unit.test_admin import AUTH, settings
from tests.unit.test_client import ADMIN_KEY, HI, URL, Server
from tests.unit.test_sources_push import checkpoint

SYSTEM = "You are a pirate. Answer like one."
SAMPLING = {
    "temperature": 0.25,
    "top_p": 0.5,
    "max_tokens": 5,
    "stop": ["zz"],
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(tmp_path: Path, engine: FakeEngine, database: str | Path) -> Iterator[TestClient]:
    app = create_app(settings(tmp_path, **registry_settings(database)), engine=engine)
    with TestClient(app) as c:
        yield c


def register(
    client: TestClient, name: str, seed: int, tmp_path: Path, defaults: Any = None
) -> ClientResponse:
    path = make_adapter(tmp_path / "allowed" / f"{name}{seed}", seed=seed)
    body: dict[str, Any] = {"name": name, "source": str(path)}
    if defaults is not None:
        body["defaults"] = defaults
    return client.post("/admin/adapters", headers=AUTH, json=body)


def add_version(
    client: TestClient, name: str, seed: int, tmp_path: Path, defaults: Any = None
) -> ClientResponse:
    path = make_adapter(tmp_path / "allowed" / f"{name}{seed}", seed=seed)
    body: dict[str, Any] = {"source": str(path)}
    if defaults is not None:
        body["defaults"] = defaults
    return client.post(f"/admin/adapters/{name}/versions", headers=AUTH, json=body)


def chat(client: TestClient, model: str, messages: Any = USER, **extra: Any) -> ClientResponse:
    r = client.post("/v1/chat/completions", json={"model": model, "messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r


def applied(r: ClientResponse) -> list[str]:
    value = r.headers.get(DEFAULTS_HEADER)
    return [] if value is None else value.split(",")


def upload_files(tmp_path: Path, seed: int) -> dict[str, tuple[str, bytes]]:
    src = make_adapter(tmp_path / f"src{seed}", seed=seed)
    return {
        name: (file, (src / file).read_bytes())
        for name, file in (
            ("adapter_config", "adapter_config.json"),
            ("adapter_model", "adapter_model.safetensors"),
        )
    }


def test_registration_stores_and_shows_defaults(
    client: TestClient, tmp_path: Path, database: str | Path, engine: FakeEngine
) -> None:
    given = {"system_prompt": SYSTEM, "temperature": 0, "stop": "zz", "max_tokens": 7}
    r = register(client, "pirate", 1, tmp_path, given)
    assert r.status_code == 201, r.text
    # As vLLM parsed them: temperature a float; declaration order.
    shown = {"system_prompt": SYSTEM, "temperature": 0.0, "max_tokens": 7, "stop": "zz"}
    assert r.json()["versions"][0]["defaults"] == shown
    assert add_version(client, "pirate", 2, tmp_path).json()["defaults"] is None
    r = add_version(client, "pirate", 3, tmp_path, SAMPLING)
    assert r.json()["defaults"] == SAMPLING
    # Uploads take them as a JSON form field.
    r = client.post(
        "/admin/adapters/upload",
        headers=AUTH,
        data={"name": "up", "defaults": json.dumps({"top_p": 0.9})},
        files=upload_files(tmp_path, 4),
    )
    assert r.status_code == 201, r.text
    r = client.post(
        "/admin/adapters/up/versions/upload",
        headers=AUTH,
        data={"defaults": json.dumps({"max_tokens": 3})},
        files=upload_files(tmp_path, 5),
    )
    assert (r.status_code, r.json()["defaults"]) == (201, {"max_tokens": 3})

    def listed(c: TestClient) -> dict[str, list[Any]]:
        data = c.get("/admin/adapters", headers=AUTH).json()["data"]
        return {a["name"]: [v["defaults"] for v in a["versions"]] for a in data}

    expected = {"pirate": [shown, None, SAMPLING], "up": [{"top_p": 0.9}, {"max_tokens": 3}]}
    assert listed(client) == expected
    assert client.get("/admin/adapters/pirate", headers=AUTH).json()["versions"][2]["defaults"] == (
        SAMPLING
    )
    # Kept in the database: a restarted server serves them.
    again = FakeEngine()
    app = create_app(settings(tmp_path, **registry_settings(database)), engine=again)
    with TestClient(app) as c:
        assert listed(c) == expected
        assert applied(chat(c, "up")) == ["max_tokens"]


BAD = [
    ({"temprature": 0.5}, "defaults.temprature", "unknown serving default"),
    ({"temperature": 5}, "defaults.temperature", "[0, 2]"),
    ({"temperature": "hot"}, "defaults.temperature", "valid number"),
    ({"top_p": 0}, "defaults.top_p", "(0, 1]"),
    ({"max_tokens": 0}, "defaults.max_tokens", "at least 1"),
    ({"max_tokens": 1.5}, "defaults.max_tokens", "valid integer"),
    ({"max_tokens": 10**6}, "defaults.max_tokens", "cap"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "defaults.stop", "at most 4 items"),
    ({"stop": [""]}, "defaults", "empty string"),
    # (vLLM's check of these names no parameter: the message does)
    ({"presence_penalty": 3}, "defaults", "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -2.5}, "defaults", "frequency_penalty must be in [-2, 2]"),
    ({"system_prompt": 5}, "defaults.system_prompt", "string"),
    # This server refuses per-request chat templates (vLLM's trust setting is off), so a
    # version cannot carry one either: the same policy.
    ({"chat_template": "{{ messages }}"}, "defaults.chat_template", "untrusted chat template"),
]


@pytest.mark.parametrize(("defaults", "param", "message"), BAD)
def test_bad_defaults_are_400_and_register_nothing(
    client: TestClient, tmp_path: Path, defaults: dict[str, Any], param: str, message: str
) -> None:
    def refused(r: ClientResponse) -> None:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "invalid_defaults",
            param,
        )
        assert message in error["message"]

    refused(register(client, "pirate", 1, tmp_path, defaults))
    assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []
    assert register(client, "pirate", 1, tmp_path).status_code == 201
    refused(add_version(client, "pirate", 2, tmp_path, defaults))
    files = upload_files(tmp_path, 3)
    upload = "/admin/adapters/pirate/versions/upload"
    refused(client.post(upload, headers=AUTH, data={"defaults": json.dumps(defaults)}, files=files))
    versions = client.get("/admin/adapters/pirate", headers=AUTH).json()["versions"]
    assert [v["version"] for v in versions] == [1]


def test_upload_defaults_must_be_a_json_object(client: TestClient, tmp_path: Path) -> None:
    for text in ("not json", "[1, 2]"):
        r = client.post(
            "/admin/adapters/upload",
            headers=AUTH,
            data={"name": "up", "defaults": text},
            files=upload_files(tmp_path, 1),
        )
        assert (r.status_code, r.json()["error"]["param"]) == (400, "defaults"), text
    assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []


def test_system_prompt_only_when_the_conversation_has_none(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    register(client, "pirate", 1, tmp_path, {"system_prompt": SYSTEM})
    r = chat(client, "pirate", max_tokens=2)
    assert applied(r) == ["system_prompt"]
    system = {"role": "system", "content": SYSTEM}
    assert engine.inputs[-1][0] == chat_prompt_ids([system, *USER])
    for role in ("system", "developer"):
        own = [{"role": role, "content": "Be brief."}, *USER]
        r = chat(client, "pirate", own, max_tokens=2)
        assert DEFAULTS_HEADER not in r.headers
        chat(client, "tiny", own, max_tokens=2)  # the base model: no defaults there
        assert engine.inputs[-2][0] == engine.inputs[-1][0], role
    # Streaming: the same prompt, the header on the stream's response.
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "pirate", "messages": USER, "max_tokens": 2, "stream": True},
    ) as s:
        assert applied(s) == ["system_prompt"]
        assert "[DONE]" in "".join(s.iter_text())
    assert engine.inputs[-1][0] == chat_prompt_ids([system, *USER])


def sampling(params: Any) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": params.stop,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
    }


def test_request_values_win_and_the_header_names_what_applied(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    register(client, "pirate", 1, tmp_path, SAMPLING)
    r = chat(client, "pirate")
    assert applied(r) == list(SAMPLING)
    assert sampling(engine.inputs[-1][1]) == SAMPLING
    assert r.json()["usage"]["completion_tokens"] == SAMPLING["max_tokens"]
    # Sent explicitly, even equal to the default: the request's own, not "applied".
    r = chat(client, "pirate", temperature=0.25, max_tokens=3, stop=[])
    assert applied(r) == ["top_p", "presence_penalty", "frequency_penalty"]
    assert sampling(engine.inputs[-1][1]) == {**SAMPLING, "max_tokens": 3, "stop": []}
    # max_completion_tokens is the request's own max_tokens too.
    r = chat(client, "pirate", max_completion_tokens=2, top_p=1, presence_penalty=0)
    assert applied(r) == ["temperature", "stop", "frequency_penalty"]
    params = engine.inputs[-1][1]
    assert (params.max_tokens, params.top_p, params.presence_penalty) == (2, 1.0, 0.0)
    # The base model and versions without defaults get none.
    r = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 1}
    )
    assert DEFAULTS_HEADER not in r.headers


def test_completions_get_the_sampling_defaults_not_the_system_prompt(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    register(client, "pirate", 1, tmp_path, {"system_prompt": SYSTEM, **SAMPLING})
    body = {"model": "pirate", "prompt": "Once upon"}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert applied(r) == list(SAMPLING)
    assert engine.inputs[-1][0] == prompt_ids("Once upon")
    assert sampling(engine.inputs[-1][1]) == SAMPLING
    with client.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "max_tokens": 16}
    ) as s:
        assert applied(s) == [k for k in SAMPLING if k != "max_tokens"]
        "".join(s.iter_text())
    assert engine.inputs[-1][1].max_tokens == 16  # OpenAI's default for completions, sent


def test_responses_api_gets_instructions_and_sampling(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    register(client, "pirate", 1, tmp_path, {"system_prompt": SYSTEM, **SAMPLING})
    r = client.post("/v1/responses", json={"model": "pirate", "input": "hi"})
    assert r.status_code == 200, r.text
    assert applied(r) == ["system_prompt", *SAMPLING]
    system = {"role": "system", "content": SYSTEM}
    assert engine.inputs[-1][0] == chat_prompt_ids([system, *USER])
    assert sampling(engine.inputs[-1][1]) == SAMPLING
    r = client.post(
        "/v1/responses",
        json={"model": "pirate", "input": "hi", "instructions": "Be brief.", "temperature": 1},
    )
    assert r.status_code == 200, r.text
    assert "system_prompt" not in applied(r) and "temperature" not in applied(r)
    own = [{"role": "system", "content": "Be brief."}, *USER]
    assert engine.inputs[-1][0] == chat_prompt_ids(own)


def test_rollback_to_a_version_without_defaults_stops_applying_them(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    register(client, "pirate", 1, tmp_path)
    add_version(client, "pirate", 2, tmp_path, {"system_prompt": SYSTEM, "max_tokens": 3})
    r = chat(client, "pirate")
    assert (r.headers["x-adapter-version"], applied(r)) == ("2", ["system_prompt", "max_tokens"])
    r = client.put("/admin/adapters/pirate/current", headers=AUTH, json={"version": 1})
    assert r.status_code == 200
    r = chat(client, "pirate", max_tokens=4)
    assert (r.headers["x-adapter-version"], applied(r)) == ("1", [])
    assert engine.inputs[-1][0] == chat_prompt_ids(USER)


def test_an_alias_arm_gets_the_defaults_of_its_version(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    register(client, "pirate", 1, tmp_path)
    add_version(client, "pirate", 2, tmp_path, {"max_tokens": 2, "temperature": 0})
    r = client.put(
        "/admin/aliases/bot", headers=AUTH, json={"variants": {"pirate@1": 1, "pirate@2": 1}}
    )
    assert r.status_code == 200, r.text
    seen = set()
    for i in range(40):
        r = chat(client, "bot", user=f"u{i}")
        variant = r.headers["x-alias-variant"]
        seen.add(variant)
        if variant == "pirate@2":
            assert applied(r) == ["temperature", "max_tokens"]
            assert engine.inputs[-1][1].temperature == 0.0
            assert r.json()["usage"]["completion_tokens"] == 2
        else:
            assert applied(r) == []
    assert seen == {"pirate@1", "pirate@2"}


# -- the Python client and the CLI -------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path)


@pytest.fixture
def transport(server: Server) -> Iterator[httpx.BaseTransport]:
    with server.running() as transport:
        yield transport


@pytest.fixture
def api(transport: httpx.BaseTransport) -> Iterator[Client]:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport, sleep=lambda _: None) as c:
        yield c


def test_the_client_registers_defaults_and_reads_the_header(
    api: Client, server: Server, tmp_path: Path
) -> None:
    defaults: ServingDefaults = {"system_prompt": SYSTEM, "max_tokens": 3}
    adapter = api.register_adapter("pirate", str(server.adapter("p1", seed=1)), defaults=defaults)
    assert adapter["versions"][0]["defaults"] == defaults
    reply = api.chat("pirate", HI)
    assert reply.served_by.defaults_applied == ("system_prompt", "max_tokens")
    assert reply.body["usage"]["completion_tokens"] == 3
    with api.chat_stream("pirate", HI, max_tokens=2) as stream:
        assert stream.served_by.defaults_applied == ("system_prompt",)
        list(stream)
    v2 = api.add_version("pirate", str(server.adapter("p2", seed=2)), defaults={"top_p": 0.5})
    assert v2["defaults"] == {"top_p": 0.5}
    local = make_adapter(tmp_path / "local" / "p3", seed=3)
    v3 = api.upload_version("pirate", local, defaults={"temperature": 0})
    assert v3["defaults"] == {"temperature": 0.0}
    assert api.completions("pirate", "Once", max_tokens=2).served_by.defaults_applied == (
        "temperature",
    )
    up = api.upload_adapter("up", local, defaults={"stop": ["\n"]})
    assert up["versions"][0]["defaults"] == {"stop": ["\n"]}
    assert api.add_version("pirate", str(server.adapter("p1", seed=1)))["defaults"] is None
    assert api.chat("pirate", HI, max_tokens=1).served_by.defaults_applied == ()
    with pytest.raises(BadRequestError) as raised:
        api.add_version("pirate", str(server.adapter("p4", seed=4)), defaults={"top_k": 5})  # type: ignore[arg-type]
    assert raised.value.param == "defaults.top_k"


@pytest.fixture
def cli(transport: httpx.BaseTransport) -> Callable[..., Any]:
    def connect(url: str, admin_key: str | None) -> Client:
        return Client(url, admin_key=admin_key, transport=transport, sleep=lambda _: None)

    env = {"LORASWAP_URL": URL, "LORASWAP_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "250"}

    def run(*args: str, code: int = 0) -> Any:
        with client_factory(connect):
            result = CliRunner().invoke(loraswap, ["adapters", *args], env=env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return run


def test_the_cli_takes_a_defaults_file_and_flags(
    cli: Callable[..., Any], api: Client, server: Server, tmp_path: Path
) -> None:
    given = tmp_path / "defaults.json"
    given.write_text(json.dumps({"system_prompt": "Arr.", "temperature": 0.5}))
    cli(
        "register",
        "pirate",
        str(server.adapter("p1", seed=1)),
        "--defaults",
        str(given),
        "--default",
        "temperature=0",
        "--default",
        "system_prompt=You are a pirate.",
    )
    # The flags over the file; VALUE as JSON when it is JSON, else text.
    expected = {"system_prompt": "You are a pirate.", "temperature": 0.0}
    assert api.get_adapter("pirate")["versions"][0]["defaults"] == expected
    show = cli("show", "pirate").stdout
    assert "system_prompt,temperature" in show
    local = make_adapter(tmp_path / "local" / "p2", seed=2)
    cli("add-version", "pirate", str(local), "--upload", "--default", "max_tokens=4")
    assert api.get_adapter("pirate")["versions"][1]["defaults"] == {"max_tokens": 4}
    run = checkpoint(tmp_path / "out" / "checkpoint-500", seed=3)
    assert "pushed pirate v3" in cli("push", str(run), "pirate", "--defaults", str(given)).stdout
    run = checkpoint(tmp_path / "out" / "checkpoint-9", seed=4)
    cli("push", str(run), "formal", "--default", 'stop=["x"]')
    assert api.get_adapter("formal")["versions"][0]["defaults"] == {"stop": ["x"]}
    assert [v["defaults"] for v in api.get_adapter("pirate")["versions"]] == [
        expected,
        {"max_tokens": 4},
        {"system_prompt": "Arr.", "temperature": 0.5},
    ]

    # Refused in one line, nothing registered: a bad file, a bad flag, the server's 400.
    given.write_text("[1]")
    result = cli("register", "x", str(server.adapter("x")), "--defaults", str(given), code=1)
    assert "must be a JSON object" in result.stderr
    result = cli("register", "x", str(server.adapter("x")), "--default", "temperature", code=1)
    assert "KEY=VALUE" in result.stderr
    result = cli("push", str(run), "x", "--default", "temperature=9", code=1)
    assert "[0, 2]" in result.stderr and "invalid_defaults" in result.stderr
    assert [a["name"] for a in api.list_adapters()] == ["formal", "pirate"]
