"""Fixtures for end-to-end tests: the real demo model and adapters, real server processes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.demo import DemoAssets, demo_assets, prepare
from server.settings import Settings
from tests.adapters import make_adapter
from tests.e2e.reference import PeftReference
from tests.e2e.server_proc import ServerProc, running_server

BASE = "smollm2"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def demo() -> DemoAssets:
    home = Settings().home
    # Idempotent: a no-op when the test command already prepared the assets.
    assets = prepare(home, progress=print) if not _ready(demo_assets(home)) else demo_assets(home)
    return assets


def _ready(assets: DemoAssets) -> bool:
    return (
        assets.base_dir.is_dir()
        and all(
            (assets.adapters_dir / n / "adapter_model.safetensors").is_file()
            for n in assets.adapter_names
        )
        and assets.quantized_dir.is_dir()
    )


@pytest.fixture(scope="session")
def adapters_dir(demo: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo adapters plus broken ones, in a folder of their own."""
    root = tmp_path_factory.mktemp("adapters")
    for name in demo.adapter_names:
        shutil.copytree(demo.adapters_dir / name, root / name)
    pickled = shutil.copytree(demo.adapters_dir / "pirate", root / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    # rank 64 with the engine's max_lora_rank at 16
    make_adapter(root / "toobig", rank=64)
    # shapes of a different (tiny) base model
    make_adapter(root / "alien", rank=8)
    truncated = shutil.copytree(demo.adapters_dir / "shout", root / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    return root


ADMIN_KEY = "e2e-admin-key"
RESULTS = Path(os.environ.get("LORASWAP_RESULTS_DIR", "build/results"))


def record_result(name: str, values: object) -> None:
    """Figures measured by e2e tests, for the record (build/results/e2e.json)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "e2e.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2))


MAX_LORAS = ["--max-loras", "3"]
# vLLM's options for tools and structured outputs (as `vllm serve` flags of the same
# names): the demo model has no tool-call format of its own, and free whitespace in
# JSON lets a 135M model pad until max_tokens.
OPENAI_ENV = {
    "LORASWAP_OPENAI__TOOL_CALL_PARSER": "pythonic",
    "LORASWAP_OPENAI__ENABLE_AUTO_TOOL_CHOICE": "true",
    "LORASWAP_OPENAI__STRUCTURED_OUTPUTS_BACKEND": "xgrammar",
    "LORASWAP_OPENAI__STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE": "true",
}


def registry_env(demo: DemoAssets, state: Path) -> dict[str, str]:
    """A private registry (database + storage) and the demo adapters as an allowed root."""
    return {
        "LORASWAP_ADMIN_KEY": ADMIN_KEY,
        "LORASWAP_REGISTRY_DB": str(state / "registry.db"),
        "LORASWAP_STORAGE_DIR": str(state / "storage"),
        "LORASWAP_ALLOWED_ROOTS": json.dumps([str(demo.adapters_dir)]),
    }


@pytest.fixture(scope="session")
def server(
    demo: DemoAssets, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    """The real server, float32 so that greedy outputs are comparable with PEFT exactly."""
    state = tmp_path_factory.mktemp("server")
    env = {**registry_env(demo, state), **OPENAI_ENV}
    # max_loras = the number of demo adapters: every engine slot holds an adapter, so
    # vLLM's bug (index -1 read as the last slot) would hit base requests (the last slot
    # of a partly empty table holds zeros and would hide it).
    with running_server(
        demo.base_dir, adapters_dir, state / "server.log", env=env, extra_args=MAX_LORAS
    ) as proc:
        record_result("server_start_to_healthy_s_float32", round(proc.start_seconds, 1))
        yield proc


@pytest.fixture(scope="session")
def reference(demo: DemoAssets) -> PeftReference:
    return PeftReference(demo.base_dir, {n: demo.adapters_dir / n for n in demo.adapter_names})
