"""Review M5 at the validator: the weights scan (every float dtype, block by block) and
the bounds on lora_alpha and r. The same cases go through HTTP in tests/abuse/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import adapters_registry.validate as validate
from adapters_registry import BaseModelShapes, Limits, MalformedAdapter, inspect_adapter
from tests.abuse.corpus import WEIGHTS, poke_tensor, set_config, to_bf16
from tests.adapters import make_adapter, make_base

LIMITS = Limits(max_rank=16, max_bytes=10_000_000)


@pytest.fixture
def base(tmp_path: Path) -> BaseModelShapes:
    return BaseModelShapes.from_dir(make_base(tmp_path / "base"), "tiny")


def check(path: Path, base: BaseModelShapes):  # type: ignore[no-untyped-def]
    return inspect_adapter(path, name="a", base=base, limits=LIMITS)


@pytest.mark.parametrize("block", [1 << 20, 7])  # one read per tensor, and many
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 5e4])
def test_bad_values_are_found_in_every_tensor_and_named(
    tmp_path: Path, base: BaseModelShapes, monkeypatch: pytest.MonkeyPatch, block: int, value: float
) -> None:
    monkeypatch.setattr(validate, "_SCAN_BLOCK", block)
    path = make_adapter(tmp_path / "a")
    tensors = load_file(str(path / WEIGHTS))
    for index in (0, len(tensors) - 1):  # the first tensor, and the last one in the file
        fresh = make_adapter(tmp_path / f"a{index}")
        name = poke_tensor(fresh, value, index=index)
        with pytest.raises(MalformedAdapter, match=name.replace(".", r"\.")):
            check(fresh, base)


def test_half_precision_and_bf16_are_scanned(tmp_path: Path, base: BaseModelShapes) -> None:
    f16 = make_adapter(tmp_path / "f16")
    tensors = {k: v.astype(np.float16) for k, v in load_file(str(f16 / WEIGHTS)).items()}
    check_ok = dict(tensors)
    save_file(check_ok, str(f16 / WEIGHTS))
    check(f16, base)  # valid half precision passes
    victim = sorted(tensors)[2]
    tensors[victim] = tensors[victim].copy()
    tensors[victim].flat[0] = np.float16("inf")
    save_file(tensors, str(f16 / WEIGHTS))
    with pytest.raises(MalformedAdapter, match="infinite"):
        check(f16, base)

    bf16 = make_adapter(tmp_path / "bf16")
    to_bf16(bf16)
    check(bf16, base)  # valid bf16 passes
    name = to_bf16(make_adapter(tmp_path / "bf16-nan"), nan_in=sorted(tensors)[1])
    with pytest.raises(MalformedAdapter, match=name.replace(".", r"\.")):
        check(tmp_path / "bf16-nan", base)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_alpha": 10**400}, "lora_alpha"),
        ({"lora_alpha": 8 * 2000}, "scale"),
        ({"use_rslora": True, "lora_alpha": 8000}, "scale"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"layers_to_transform": [10**400]}, "out of range"),
    ],
)
def test_config_numbers_are_bounded(
    tmp_path: Path, base: BaseModelShapes, fields: dict[str, object], message: str
) -> None:
    path = make_adapter(tmp_path / "a")
    set_config(path, **fields)
    with pytest.raises(MalformedAdapter, match=message):
        check(path, base)


def test_rslora_scale_within_bounds_passes(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a")
    set_config(path, use_rslora=True, lora_alpha=64)
    spec = check(path, base)
    assert spec.config_sha256 is not None
