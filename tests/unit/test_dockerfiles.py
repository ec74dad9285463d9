"""The two images: hadolint-clean, installed as scripts/setup.sh installs, and wired to
the entrypoint, health check, volumes and non-root user. (No Docker engine here: nothing
is built; see README "Docker".)"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_entrypoint import dev_tool

ROOT = Path(__file__).parents[2]
CPU = ROOT / "Dockerfile"
CUDA = ROOT / "deploy" / "Dockerfile.cuda"
IMAGES = {"cpu": CPU, "gpu": CUDA}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending
    return out


def args_of(path: Path, word: str) -> list[str]:
    return [rest for w, rest in instructions(path) if w == word]


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in args_of(path, "ENV"):
        env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def pip_extras(text: str) -> set[str]:
    """Extras of the project's own install: `pip install ... ".[a,b]"`."""
    match = re.search(r"pip install [^\n]*?\"?(?:-e )?\"?\.\[([^\]]+)\]", text)
    assert match, text
    return set(match.group(1).split(","))


def pip_uninstalled(text: str) -> set[str]:
    match = re.search(r"pip uninstall [^\n]*?-y ((?:[A-Za-z][\w-]* ?)+)", text)
    return set(match.group(1).split()) if match else set()


@pytest.mark.parametrize("path", [CPU, CUDA], ids=["cpu", "cuda"])
def test_hadolint(path: Path) -> None:
    hadolint = dev_tool("hadolint")
    # With shellcheck on PATH, hadolint also checks every RUN line's shell.
    shellcheck_dir = str(Path(dev_tool("shellcheck")).parent)
    proc = subprocess.run(
        [hadolint, "--no-color", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": f"{shellcheck_dir}:{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    # Guards the test above: a Dockerfile with known problems makes hadolint fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /app && apt-get install gcc\nUSER root\n")
    proc = subprocess.run(
        [dev_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout and "DL3003" in proc.stdout


@pytest.mark.parametrize("engine", ["cpu", "gpu"])
def test_installed_as_setup_sh_installs(engine: str) -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    image = IMAGES[engine].read_text()
    # setup.sh: .[${engine},demo,postgres,s3,dev]; an image is the same less the dev
    # tools: a PostgreSQL registry and s3:// sources work in the image as in a checkout.
    expected = {engine if e == "${engine}" else e for e in pip_extras(setup)} - {"dev"}
    assert pip_extras(image) == expected == {engine, "demo", "postgres", "s3"}
    # The engine extra is vLLM's build for it.
    assert re.search(rf'^{engine} = \["vllm', (ROOT / "pyproject.toml").read_text(), re.M)
    # On CPU, setup.sh removes the CUDA builds of torchvision & co. pip pulls in; so must
    # the CPU image, and only it.
    assert 'if [ "$engine" = cpu ]' in setup
    removed = pip_uninstalled(setup)
    assert removed == {"torchvision", "torchaudio", "torchcodec"}
    assert pip_uninstalled(image) == (removed if engine == "cpu" else set())


@pytest.mark.parametrize("path", [CPU, CUDA], ids=["cpu", "cuda"])
def test_runtime_wiring(path: Path) -> None:
    env = env_of(path)
    assert env["LORASWAP_HOME"] == "/data"
    assert env["LORASWAP_HOST"] == "0.0.0.0"
    assert args_of(path, "EXPOSE") == [env["LORASWAP_PORT"]]

    volumes = {v for rest in args_of(path, "VOLUME") for v in json.loads(rest)}
    assert volumes == {"/data", "/models", "/adapters"}

    user = args_of(path, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user

    assert json.loads(args_of(path, "ENTRYPOINT")[-1]) == ["docker-entrypoint.sh"]
    assert json.loads(args_of(path, "CMD")[-1]) == ["serve"]
    (health,) = args_of(path, "HEALTHCHECK")
    assert re.search(r"--start-period=\d+m", health)
    assert health.split("CMD", 1)[1].strip() == '["docker-entrypoint.sh", "healthcheck"]'

    # Every COPY source exists, and the entrypoint lands on PATH.
    copies = [rest.split() for rest in args_of(path, "COPY")]
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
    assert ["deploy/docker-entrypoint.sh", "/usr/local/bin/docker-entrypoint.sh"] in copies
    assert os.access(ROOT / "deploy" / "docker-entrypoint.sh", os.X_OK)


def test_build_context_keeps_what_the_images_copy() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git"} <= ignored
    for path in IMAGES.values():
        for rest in args_of(path, "COPY"):
            for source in rest.split()[:-1]:
                assert not any(source == i or source.startswith(i + "/") for i in ignored)
