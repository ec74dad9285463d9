"""The `loraswap` command as users run it: the installed console script's entry point
(`server.cli:main`, from the package metadata), in a subprocess, against a real server
over HTTP (uvicorn in a thread, the fake engine). Every command group the README
documents must be mounted there, not only in a test's own copy of the CLI."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.settings import Settings
from tests.adapters import make_base
from tests.fakes import FakeEngine

KEY = "cli-admin-key"
ROOT = Path(__file__).parents[2]
# Runs the console script's entry point exactly as the `loraswap` wrapper does.
RUN_SCRIPT = (
    "import sys\n"
    "from importlib.metadata import entry_points\n"
    "(ep,) = [e for e in entry_points(group='console_scripts') if e.name == 'loraswap']\n"
    "sys.argv[0] = 'loraswap'\n"
    "sys.exit(ep.load()())\n"
)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cli")
    make_base(tmp / "base")
    settings = Settings(
        served_model_name="tiny", model=tmp / "base", home=tmp / "home", admin_key=KEY
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings, engine=FakeEngine()), host="127.0.0.1", port=port, log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(10)


def loraswap(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_console_script_is_the_cli_main() -> None:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "loraswap"]
    assert ep.value == "server.cli:main"


def test_tenants_command_of_the_real_cli(url: str) -> None:
    auth = ["--url", url, "--admin-key", KEY]
    created = loraswap("tenants", "create", "acme", "--max-concurrent", "3", *auth)
    assert created.returncode == 0, created.stderr
    listed = loraswap("tenants", "list", "--json", *auth)
    assert listed.returncode == 0, listed.stderr
    assert [t["name"] for t in json.loads(listed.stdout)] == ["acme"]
    r = httpx.get(f"{url}/admin/tenants/acme", headers={"authorization": f"Bearer {KEY}"})
    assert r.json()["max_concurrent"] == 3
    # Every command group the README names is there.
    for group in ("adapters", "aliases", "tenants", "demo"):
        shown = loraswap(group, "--help")
        assert shown.returncode == 0, (group, shown.stderr)


def test_serve_runs_uvicorn_with_the_connection_bound_and_the_real_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loraswap serve` bounds connections (`limit_concurrency`) and keeps the TCP peer as
    the client address (no X-Forwarded-For rewriting): open mode decides on it."""
    from typer.testing import CliRunner

    import server.cli as cli
    import server.cli.serve as serve

    started: list[uvicorn.Config] = []

    class Recorder:
        def __init__(self, config: uvicorn.Config, *args: object) -> None:
            started.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(serve, "DrainingServer", Recorder)
    # `serve` sets up the request log (its own handler, no propagation): undone after.
    requests_log = logging.getLogger("loraswap.requests")
    monkeypatch.setattr(requests_log, "handlers", [])
    monkeypatch.setattr(requests_log, "propagate", True)
    monkeypatch.setenv("LORASWAP_LIMIT_CONCURRENCY", "77")
    make_base(tmp_path / "base")
    result = CliRunner().invoke(
        cli.app, ["serve", "--model", str(tmp_path / "base"), "--home", str(tmp_path / "h")]
    )
    assert result.exit_code == 0, result.output
    (config,) = started
    assert config.limit_concurrency == 77
    assert config.proxy_headers is False


def test_serve_flags_set_their_settings_and_leave_the_rest_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `serve` flag lands in its settings field (`--dtype`: engine.dtype, `--replicas`:
    ray.replicas, ...); a flag left off, None or an unset on/off flag, keeps the
    environment's value."""
    from typer.testing import CliRunner

    import server.cli as cli
    import server.cli.serve as serve

    ran: list[tuple[Settings, dict[str, bool]]] = []
    monkeypatch.setattr(serve, "_run", lambda settings, **how: ran.append((settings, how)))
    monkeypatch.setenv("LORASWAP_ENGINE__MAX_LORAS", "5")
    monkeypatch.setenv("LORASWAP_OPENAI__ENABLE_AUTO_TOOL_CHOICE", "true")
    monkeypatch.setenv("LORASWAP_OPENAI__TOOL_CALL_PARSER", "pythonic")  # the flag's wins
    flags = [
        *("--model", str(tmp_path / "base"), "--home", str(tmp_path / "h")),
        *("--dtype", "float32", "--max-lora-rank", "32", "--kv-cache-gib", "3"),
        *("--tool-call-parser", "hermes", "--structured-outputs-backend", "guidance"),
        *("--ray", "--ray-address", "auto", "--replicas", "3", "--max-replicas-per-node", "2"),
        *("--adapters-per-replica", "6", "--unsafe-allow-open-network", "--port", "9001"),
    ]
    result = CliRunner().invoke(cli.app, ["serve", *flags])
    assert result.exit_code == 0, result.output
    ((settings, how),) = ran
    assert how == {"demo": False, "quantized": False, "ray": True}
    assert (settings.model, settings.home, settings.port) == (
        tmp_path / "base",
        tmp_path / "h",
        9001,
    )
    assert settings.unsafe_allow_open_network is True
    engine, openai, ray = settings.engine, settings.openai, settings.ray
    assert (engine.dtype, engine.max_lora_rank, engine.kv_cache_gib) == ("float32", 32, 3)
    assert engine.max_loras == 5  # not given: the environment's
    assert (openai.tool_call_parser, openai.structured_outputs_backend) == ("hermes", "guidance")
    assert openai.enable_auto_tool_choice is True  # the flag left off does not unset it
    assert (ray.address, ray.replicas, ray.max_replicas_per_node) == ("auto", 3, 2)
    assert ray.adapters_per_replica == 6
