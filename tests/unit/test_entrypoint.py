"""deploy/docker-entrypoint.sh, run with bash under a controlled environment.

A stub `loraswap` on PATH records the command line the entrypoint execs and the
environment it gets, so each test asserts exactly what the container would run, or that a
bad environment stops it with a clear message before anything starts.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).parents[2] / "deploy" / "docker-entrypoint.sh"
STUB = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$STUB_OUT"
env -0 > "$STUB_OUT.env"
echo $$ > "$STUB_OUT.pid"
"""


@dataclass
class Run:
    code: int
    stderr: str
    argv: list[str] | None  # what `loraswap` was exec'd with; None if it never ran
    env: dict[str, str]
    replaced: bool  # loraswap ran in the entrypoint's own process (exec: it gets the signals)


class Box:
    """A fake container filesystem under tmp_path: data volume, model and adapters mounts."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.data = tmp_path / "data"
        self.models = tmp_path / "models"
        self.adapters = tmp_path / "adapters"
        self.stub_out = tmp_path / "stub-out"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        stub = bin_dir / "loraswap"
        stub.write_text(STUB)
        stub.chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "STUB_OUT": str(self.stub_out),
            # What the image sets, with the mount points moved under tmp_path.
            "LORASWAP_HOME": str(self.data),
            "LORASWAP_HOST": "0.0.0.0",
            "LORASWAP_PORT": "8000",
            "LORASWAP_MODEL_MOUNT": str(self.models),
            "LORASWAP_ADAPTERS_MOUNT": str(self.adapters),
            "LORASWAP_ADMIN_KEY": "admin-secret",
            # The settings check imports server.settings, from this checkout.
            "LORASWAP_PYTHON": sys.executable,
            "PYTHONPATH": str(ENTRYPOINT.parents[1]),
        }

    def mount_model(self, path: Path | None = None) -> Path:
        path = path or self.models
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        return path

    def run(self, *args: str, **env: str | None) -> Run:
        full = {**self.env, **env}
        merged = {k: v for k, v in full.items() if v is not None}
        self.stub_out.unlink(missing_ok=True)
        with subprocess.Popen(
            ["bash", str(ENTRYPOINT), *args],
            env=merged,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            _, stderr = proc.communicate(timeout=30)
        argv = None
        seen: dict[str, str] = {}
        replaced = False
        if self.stub_out.exists():
            argv = self.stub_out.read_text().split("\0")[:-1]
            for item in Path(f"{self.stub_out}.env").read_text().split("\0")[:-1]:
                key, _, value = item.partition("=")
                seen[key] = value
            replaced = Path(f"{self.stub_out}.pid").read_text().strip() == str(proc.pid)
        return Run(proc.returncode, stderr, argv, seen, replaced)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def assert_refused(run: Run, *needles: str) -> None:
    assert run.code == 64, run
    assert run.argv is None, "loraswap must not start"
    assert "docker-entrypoint: error:" in run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


# -- what it runs ----------------------------------------------------------------------


def test_serves_the_mounted_model_and_adapters(box: Box) -> None:
    box.mount_model()
    box.adapters.mkdir()
    run = box.run()
    assert run.code == 0, run.stderr
    assert run.argv == ["serve"]
    assert run.replaced, "exec, so that loraswap is PID 1 and gets SIGTERM (drain)"
    assert run.env["LORASWAP_MODEL"] == str(box.models)
    assert run.env["LORASWAP_ADAPTERS_DIR"] == str(box.adapters)
    assert run.env["LORASWAP_ADMIN_KEY"] == "admin-secret"
    # The data folders are prepared.
    assert (box.data / "registry").is_dir()
    assert f"serving {box.models}" in run.stderr


def test_flags_pass_through_with_or_without_serve(box: Box) -> None:
    box.mount_model()
    assert box.run("serve", "--max-loras", "8").argv == ["serve", "--max-loras", "8"]
    assert box.run("--max-loras", "8", "--dtype=float32").argv == [
        "serve",
        "--max-loras",
        "8",
        "--dtype=float32",
    ]


def test_explicit_model_and_adapters_win_over_the_mounts(box: Box) -> None:
    box.mount_model()
    box.adapters.mkdir()
    other = box.mount_model(box.root / "elsewhere")
    mine = box.root / "my-adapters"
    mine.mkdir()
    run = box.run(LORASWAP_MODEL=str(other), LORASWAP_ADAPTERS_DIR=str(mine))
    assert run.argv == ["serve"]
    assert run.env["LORASWAP_MODEL"] == str(other)
    assert run.env["LORASWAP_ADAPTERS_DIR"] == str(mine)
    # A --model flag is left to the server (which checks it); no mount is needed.
    run = box.run("serve", "--model", str(other), LORASWAP_MODEL_MOUNT=str(box.root / "none"))
    assert run.argv == ["serve", "--model", str(other)]
    assert "LORASWAP_MODEL" not in run.env


def test_no_adapters_mount_means_no_adapters_dir(box: Box) -> None:
    box.mount_model()
    run = box.run()
    assert run.argv == ["serve"]
    assert "LORASWAP_ADAPTERS_DIR" not in run.env


@pytest.mark.parametrize(
    ("env", "argv"),
    [
        ({"LORASWAP_DEMO": "1"}, ["serve", "--demo"]),
        (
            {"LORASWAP_DEMO": "true", "LORASWAP_QUANTIZED": "yes"},
            ["serve", "--demo", "--quantized"],
        ),
        ({}, ["serve", "--demo"]),  # given as a flag: `docker run IMAGE serve --demo`
    ],
)
def test_demo(box: Box, env: dict[str, str], argv: list[str]) -> None:
    box.adapters.mkdir()  # mounted, but the demo serves its own adapters
    args = () if env else ("serve", "--demo")
    run = box.run(*args, **env)
    assert run.code == 0, run.stderr
    assert run.argv == argv
    assert "LORASWAP_MODEL" not in run.env
    assert "LORASWAP_ADAPTERS_DIR" not in run.env
    assert "serving the demo model" in run.stderr


def test_admin_key_from_a_file(box: Box, tmp_path: Path) -> None:
    box.mount_model()
    secret = tmp_path / "admin_key"
    secret.write_text("from-a-file\n")
    run = box.run(LORASWAP_ADMIN_KEY=None, LORASWAP_ADMIN_KEY_FILE=str(secret))
    assert run.code == 0, run.stderr
    assert run.env["LORASWAP_ADMIN_KEY"] == "from-a-file"
    assert "LORASWAP_ADMIN_KEY_FILE" not in run.env


@pytest.mark.parametrize(
    "env",
    [
        {"LORASWAP_UNSAFE_ALLOW_OPEN_NETWORK": "true"},
        {"LORASWAP_HOST": "127.0.0.1"},
        {"LORASWAP_HOST": "localhost"},
    ],
)
def test_no_admin_key_is_fine_on_loopback_or_when_opened_deliberately(
    box: Box, env: dict[str, str]
) -> None:
    box.mount_model()
    run = box.run(LORASWAP_ADMIN_KEY=None, **env)
    assert run.code == 0, run.stderr
    assert run.argv == ["serve"]


def test_no_admin_key_with_an_existing_registry_may_have_tenants(box: Box) -> None:
    box.mount_model()
    box.data.mkdir()
    (box.data / "registry.db").write_bytes(b"")
    run = box.run(LORASWAP_ADMIN_KEY=None)
    assert run.argv == ["serve"]
    assert "starts only if the registry" in run.stderr
    run = box.run("--unsafe-allow-open-network", LORASWAP_ADMIN_KEY=None)
    assert run.argv == ["serve", "--unsafe-allow-open-network"]
    assert "starts only if" not in run.stderr


def test_help_needs_no_model(box: Box) -> None:
    assert box.run("--help").argv == ["serve", "--help"]
    assert box.run("serve", "--help", LORASWAP_PORT="bad").argv == ["serve", "--help"]


def test_other_commands_run_without_checks(box: Box) -> None:
    # No model anywhere, no admin key: admin subcommands and shells still run.
    run = box.run("adapters", "list", "--url", "http://server:8000", LORASWAP_ADMIN_KEY=None)
    assert run.code == 0, run.stderr
    assert run.argv == ["adapters", "list", "--url", "http://server:8000"]
    assert run.replaced
    out = box.root / "shell-ran"
    run = box.run("bash", "-c", f"touch {out}")
    assert run.code == 0 and out.exists() and run.argv is None


# -- what it refuses -------------------------------------------------------------------


def test_no_model(box: Box) -> None:
    assert_refused(box.run(), "no model", str(box.models), "LORASWAP_DEMO=1")


def test_model_folder_missing_or_not_a_model(box: Box) -> None:
    missing = box.root / "missing"
    assert_refused(box.run(LORASWAP_MODEL=str(missing)), f"LORASWAP_MODEL={missing}", "mounted")
    empty = box.root / "empty"
    empty.mkdir()
    assert_refused(box.run(LORASWAP_MODEL=str(empty)), "no config.json")


def test_adapters_dir_missing(box: Box) -> None:
    box.mount_model()
    missing = box.root / "nope"
    assert_refused(box.run(LORASWAP_ADAPTERS_DIR=str(missing)), f"LORASWAP_ADAPTERS_DIR={missing}")


@pytest.mark.parametrize("port", ["80a", "0", "65536", "-1", "", " 80"])
def test_bad_port(box: Box, port: str) -> None:
    box.mount_model()
    assert_refused(box.run(LORASWAP_PORT=port), f"LORASWAP_PORT={port}", "1 to 65535")
    assert box.run(LORASWAP_PORT=None).argv == ["serve"]  # unset: the server's default


@pytest.mark.parametrize(
    "name",
    ["LORASWAP_DEMO", "LORASWAP_QUANTIZED", "LORASWAP_UNSAFE_ALLOW_OPEN_NETWORK"],
)
def test_bad_boolean(box: Box, name: str) -> None:
    box.mount_model()
    assert_refused(box.run(**{name: "maybe"}), f"{name}=maybe", "true or false")
    # Set but empty: the server could not parse it either.
    assert_refused(box.run(**{name: ""}), f"{name}=:", "true or false")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LORASWAP_ENGINE__MAX_LORA_RANK", "7"),
        ("LORASWAP_MAX_IN_FLIGHT", "0"),
        ("LORASWAP_ENGINE__DTYPE", "fp8"),
        ("LORASWAP_ALLOWED_ROOTS", "/srv/adapters"),  # must be a JSON list
    ],
)
def test_any_setting_the_server_would_reject(box: Box, name: str, value: str) -> None:
    box.mount_model()
    run = box.run(**{name: value})
    field = name.removeprefix("LORASWAP_").lower().replace("__", ".")
    assert_refused(run, "invalid settings")
    assert f"{name}:" in run.stderr or f'field "{field}"' in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_contradictions(box: Box) -> None:
    model = box.mount_model()
    assert_refused(box.run(LORASWAP_QUANTIZED="1"), "LORASWAP_QUANTIZED", "LORASWAP_DEMO=1")
    assert_refused(box.run(LORASWAP_DEMO="1", LORASWAP_MODEL=str(model)), "unset LORASWAP_MODEL")
    key = box.root / "key"
    key.write_text("k")
    assert_refused(box.run(LORASWAP_ADMIN_KEY_FILE=str(key)), "not both")


def test_admin_key_file_unreadable_or_empty(box: Box) -> None:
    box.mount_model()
    missing = box.root / "no-such-secret"
    assert_refused(
        box.run(LORASWAP_ADMIN_KEY=None, LORASWAP_ADMIN_KEY_FILE=str(missing)),
        "not a readable file",
    )
    empty = box.root / "empty-secret"
    empty.write_text("\n")
    assert_refused(box.run(LORASWAP_ADMIN_KEY=None, LORASWAP_ADMIN_KEY_FILE=str(empty)), "is empty")


def test_open_network_without_keys_on_a_fresh_registry(box: Box) -> None:
    box.mount_model()
    assert_refused(
        box.run(LORASWAP_ADMIN_KEY=None),
        "serving on 0.0.0.0 with no API keys",
        "LORASWAP_ADMIN_KEY",
        "LORASWAP_UNSAFE_ALLOW_OPEN_NETWORK=true",
    )


def test_data_folders_must_be_creatable_and_absolute(box: Box) -> None:
    box.mount_model()
    blocker = box.root / "a-file"
    blocker.write_text("")
    assert_refused(box.run(LORASWAP_HOME=str(blocker / "data")), "cannot create")
    assert_refused(box.run(LORASWAP_HOME="relative/data"), "must be an absolute path")
    assert_refused(box.run(LORASWAP_HOME=None), "LORASWAP_HOME is not set")
    assert_refused(box.run(LORASWAP_STORAGE_DIR=str(blocker / "storage")), "LORASWAP_STORAGE_DIR")


# -- healthcheck -----------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    _Health.status = 200


def test_healthcheck(box: Box, health_server: http.server.HTTPServer) -> None:
    port = str(health_server.server_address[1])
    env = {"LORASWAP_PORT": port, "LORASWAP_PYTHON": sys.executable}
    # 0.0.0.0 (the image's bind address) is checked through loopback.
    assert box.run("healthcheck", **env).code == 0
    _Health.status = 503
    run = box.run("healthcheck", **env)
    assert run.code == 1 and "unhealthy" in run.stderr
    health_server.shutdown()
    health_server.server_close()
    run = box.run("healthcheck", **env)
    assert run.code == 1 and "unhealthy" in run.stderr


# -- lint ------------------------------------------------------------------------------


def dev_tool(name: str) -> str:
    """A linter of the dev extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def test_shellcheck() -> None:
    proc = subprocess.run(
        [dev_tool("shellcheck"), str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
