"""`loraswap adapters push DIR NAME`: from a training run's output folder to a served
version, against the real app in-process (fake engine) through the real HTTP client."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from clients import Client
from server.cli import app as loraswap
from server.cli.options import client_factory
from tests.adapters import make_adapter, make_base
from tests.unit.test_client import ADMIN_KEY, HI, URL, Server

runner = CliRunner()


def checkpoint(path: Path, **kwargs: Any) -> Path:
    """What `Trainer` leaves in checkpoint-N: the PEFT files, and pickles beside them
    (optimizer and scheduler state, training args) that push must not upload."""
    make_adapter(path, **kwargs)
    (path / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (path / name).write_bytes(b"\x80\x04K\x01.")  # a pickle
    return path


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path)


@pytest.fixture
def transport(server: Server) -> Iterator[httpx.BaseTransport]:
    with server.running() as transport:
        yield transport


@pytest.fixture
def push(transport: httpx.BaseTransport) -> Callable[..., Any]:
    def connect(url: str, admin_key: str | None) -> Client:
        return Client(url, admin_key=admin_key, transport=transport, sleep=lambda _: None)

    env = {"LORASWAP_URL": URL, "LORASWAP_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "250"}

    def run(*args: str, code: int = 0) -> Any:
        with client_factory(connect):
            result = runner.invoke(loraswap, ["adapters", "push", *args], env=env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return run


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_push_a_checkpoint_then_serve_it(
    push: Callable[..., Any], server: Server, transport: httpx.BaseTransport, tmp_path: Path
) -> None:
    run = checkpoint(tmp_path / "out" / "checkpoint-500", seed=1)
    out = push(str(run), "pirate").stdout
    assert f"checked {run}: rank 8" in out
    assert "pushed pirate v1 (rank 8" in out and "(current)" in out
    (curl,) = [line for line in out.splitlines() if line.startswith("curl ")]
    assert f"{URL}/v1/chat/completions" in curl and '"model": "tiny:pirate"' in curl
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as client:
        (version,) = client.get_adapter("pirate")["versions"]
        assert version["sha256"] == _sha(run)
        client.chat("tiny:pirate", HI, max_tokens=2)  # the request the curl line makes
    (handle,) = server.engine.loaded
    assert handle.name == "pirate@1" and _sha(Path(handle.path)) == _sha(run)
    assert sorted(p.name for p in Path(handle.path).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # the pickles beside it stayed home

    # The next checkpoint of the same run: the next version, current at once (or staged).
    later = checkpoint(tmp_path / "out" / "checkpoint-1000", seed=2)
    assert "pushed pirate v2" in push(str(later), "pirate").stdout
    staged = checkpoint(tmp_path / "out" / "checkpoint-1500", seed=3)
    assert "(staged" in push(str(staged), "pirate", "--stage").stdout
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as client:
        assert client.get_adapter("pirate")["current_version"] == 2


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
        (lambda p: _retarget(p), "target_modules"),
        (lambda p: _truncate(p), "adapter_model.safetensors"),
    ],
    ids=["no-weights", "bad-json", "config-disagrees", "truncated"],
)
def test_a_bad_adapter_is_refused_before_any_upload(
    push: Callable[..., Any],
    transport: httpx.BaseTransport,
    tmp_path: Path,
    spoil: Callable[[Path], object],
    message: str,
) -> None:
    run = checkpoint(tmp_path / "checkpoint-1")
    spoil(run)
    result = push(str(run), "pirate", code=1)
    assert "refused" in result.stderr and message in result.stderr
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as client:
        assert client.list_adapters() == []


def test_base_given_locally_is_checked_too(
    push: Callable[..., Any], transport: httpx.BaseTransport, tmp_path: Path
) -> None:
    run = checkpoint(tmp_path / "checkpoint-1", hidden_scale=2)  # for a wider base
    other_base = make_base(tmp_path / "base-here")
    result = push(str(run), "pirate", "--base", str(other_base), code=1)
    assert "refused" in result.stderr and "different base" in result.stderr
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as client:
        assert client.list_adapters() == []


def _retarget(path: Path) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the weights cover v_proj too
    (path / "adapter_config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])
