"""The bad-adapter corpus (corpus.py) through the real HTTP API (in-process app, fake
engine): each refused with its 4xx and code, nothing registered, no file left in the
registry's storage, and the server still serving the base and a good adapter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters_registry.errors import SourceChanged
from server.app import create_app
from server.settings import Settings
from tests.abuse.corpus import CASES, CONFIG, WEIGHTS, Case, set_config
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine
from tests.testclient import ClientResponse

KEY = "abuse-admin-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "allowed").mkdir()
    (tmp_path / "outside").mkdir()
    make_adapter(tmp_path / "allowed" / "good")
    settings = Settings(
        served_model_name="tiny",
        model=make_base(tmp_path / "base"),
        home=tmp_path / "home",
        admin_key=KEY,
        allowed_roots=[tmp_path / "allowed"],
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as c:
        assert register(c, "good", tmp_path / "allowed" / "good").status_code == 201
        yield c


def register(client: TestClient, name: str, path: Path) -> ClientResponse:
    return client.post("/admin/adapters", headers=AUTH, json={"name": name, "source": str(path)})


def upload(client: TestClient, name: str, folder: Path) -> ClientResponse:
    files = {
        "adapter_config": (CONFIG, (folder / CONFIG).read_bytes()),
        "adapter_model": (WEIGHTS, (folder / WEIGHTS).read_bytes()),
    }
    return client.post("/admin/adapters/upload", headers=AUTH, data={"name": name}, files=files)


def chat(client: TestClient, model: str) -> ClientResponse:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    return client.post("/v1/chat/completions", json=body)


def assert_refused(r: ClientResponse, case: Case) -> None:
    error = r.json()["error"] if r.headers.get("content-type") == "application/json" else {}
    answer = (r.status_code, error.get("code"))
    assert answer in ((case.status, case.code), *case.also), r.text
    assert case.message in error["message"], error


def assert_unharmed(client: TestClient, tmp_path: Path, name: str) -> None:
    """Nothing registered or stored for `name`, and the server serves as before."""
    names = [a["name"] for a in client.get("/admin/adapters", headers=AUTH).json()["data"]]
    assert names == ["good"]
    assert chat(client, name).status_code == 404
    storage = tmp_path / "home"
    leftovers = [
        p
        for p in storage.rglob("*")
        if p.is_file() and "uploads" in p.parts and ".staging" in str(p)
    ]
    assert leftovers == []
    # The store holds the registered adapters' copies (local sources are copied at
    # registration), nothing else.
    registry = client.app.state.router.registry  # type: ignore[attr-defined]
    kept = {Path(v.path).name for a in registry.adapters() for v in a.versions}
    uploads = storage.rglob("uploads/*")
    assert {p.name for p in uploads if not p.name.startswith(".")} <= kept
    assert chat(client, "tiny").status_code == 200
    r = chat(client, "good")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith(
        "good@1"
    )


def _params(upload_too: bool) -> list[object]:
    out: list[object] = []
    for case in CASES:
        if upload_too and (case.id.startswith("symlinked") or case.id in ("pickle", "fifo")):
            continue  # an upload is two byte streams: no symlink, FIFO or .bin to send
        out.append(pytest.param(case, id=case.id))
    return out


@pytest.mark.parametrize("case", _params(upload_too=False))
def test_bad_local_adapter_is_refused(client: TestClient, tmp_path: Path, case: Case) -> None:
    folder = make_adapter(tmp_path / "allowed" / "bad")
    case.spoil(folder, tmp_path / "outside")
    # A FIFO must not hang the server: the request answers (pytest-timeout backs this).
    assert_refused(register(client, "bad", folder), case)
    assert_unharmed(client, tmp_path, "bad")


@pytest.mark.parametrize("case", _params(upload_too=True))
def test_bad_upload_is_refused(client: TestClient, tmp_path: Path, case: Case) -> None:
    folder = make_adapter(tmp_path / "outside" / "bad")
    case.spoil(folder, tmp_path / "outside")
    assert_refused(upload(client, "bad", folder), case)
    assert_unharmed(client, tmp_path, "bad")


def test_symlinked_folder_is_refused(client: TestClient, tmp_path: Path) -> None:
    real = make_adapter(tmp_path / "outside" / "real")
    os.symlink(real, tmp_path / "allowed" / "link")
    r = register(client, "bad", tmp_path / "allowed" / "link")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "path_outside_roots")
    assert_unharmed(client, tmp_path, "bad")


def test_config_changed_after_registration_is_not_served(
    client: TestClient, tmp_path: Path
) -> None:
    folder = make_adapter(tmp_path / "allowed" / "pirate", seed=7)
    assert register(client, "pirate", folder).status_code == 201
    set_config(folder, lora_alpha=64)  # same weights, another scale, in the source folder
    # Local sources are copied at registration: the registered content keeps serving.
    registry = client.app.state.router.registry  # type: ignore[attr-defined]
    version = registry.adapter("pirate").current
    assert '"lora_alpha": 16' in (registry.local_files(version) / CONFIG).read_text()
    assert chat(client, "pirate").status_code == 200
    # The stored copy changed behind the registry's back (seen on its first use after a
    # start): 409, never the other scale under the old name.
    set_config(Path(version.path), lora_alpha=64)
    registry._verified.clear()
    with pytest.raises(SourceChanged):
        registry.local_files(version)
    assert chat(client, "good").status_code == 200


def test_same_weights_with_another_config_is_another_content(
    client: TestClient, tmp_path: Path
) -> None:
    folder = make_adapter(tmp_path / "outside" / "x")
    assert upload(client, "one", folder).status_code == 201
    set_config(folder, lora_alpha=64)
    assert upload(client, "two", folder).status_code == 201
    registry = client.app.state.router.registry  # type: ignore[attr-defined]
    one, two = (registry.adapter(n).current for n in ("one", "two"))
    assert one.sha256 == two.sha256 and one.content_digest != two.content_digest
    for version, alpha in ((one, 16), (two, 64)):
        served = registry.local_files(version) / CONFIG
        assert f'"lora_alpha": {alpha}' in served.read_text()
    assert chat(client, "one").status_code == chat(client, "two").status_code == 200


def test_an_admin_registration_is_not_hijacked_by_a_folder(tmp_path: Path) -> None:
    """Review M9: in Docker /adapters is both the adapters directory and an allowed root.
    Registering /adapters/support-v1 as `support` is the admin's adapter: a `support/`
    folder there must not take it over (nor its absence turn it into a 404)."""
    adapters = tmp_path / "adapters"
    make_adapter(adapters / "support-v1", seed=1)
    settings = Settings(
        served_model_name="tiny",
        model=make_base(tmp_path / "base"),
        home=tmp_path / "home",
        admin_key=KEY,
        adapters_dir=adapters,
        allowed_roots=[adapters],
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        assert register(client, "support", adapters / "support-v1").status_code == 201
        r = chat(client, "support")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("support@1")
        make_adapter(adapters / "support", seed=2)  # a folder of that name appears
        r = chat(client, "support")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("support@1")
        record = client.get("/admin/adapters/support", headers=AUTH).json()
        assert [v["version"] for v in record["versions"]] == [1]
