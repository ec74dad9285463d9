"""server.engine.lora: the -1-safe CPU LoRA ops, the upstream probe, and their binding.

The ops are checked against a plain per-token float64 computation (zero contribution for
index -1) on every code path of the op (runs / dense / grouped, asserted by spying on
which one ran), and against vLLM 0.32.0's own torch ops wherever those are correct (no
index -1). No engine is started; vLLM's torch ops module is imported only to compare.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from server.engine.lora import device, kernels, ops
from server.engine.lora.patch import bind_fixes

upstream = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

HIDDEN = 96
OUT = 80
SLOTS = 4

# name -> (slot per row). Lengths and layouts chosen so that each one takes a known
# strategy of kernels._lora_mm (see EXPECTED_PATH) with SLOTS slots.
PATTERNS: dict[str, list[int]] = {
    # one adapter for the whole batch
    "single": [2] * 7,
    # base rows around one adapter block: the first rows must not get slot 3 (= last)
    "base_and_adapter": [-1, -1, 1, 1, 1, -1],
    # decode-like: every row a different slot, base rows interleaved
    "interleaved": [0, -1, 3, 1, -1, 2, 0, 3, 1],
    # prefill-like: long runs, more rows than the dense threshold allows
    "long_runs": [0] * 60 + [-1] * 50 + [3] * 40 + [1] * 30 + [0] * 20,
    # fragmented, one matmul against all slots
    "fragmented": [(i * 7) % 5 - 1 for i in range(200)],
    # the same, with the dense strategy's budget at 0 (see _path_for): grouped per slot
    "fragmented_grouped": [(i * 7) % 5 - 1 for i in range(200)],
    # base model only
    "all_base": [-1] * 5,
}
EXPECTED_PATH: dict[str, str | None] = {
    "single": "_mm_runs",
    "base_and_adapter": "_mm_runs",
    "interleaved": "_mm_dense",
    "long_runs": "_mm_runs",
    "fragmented": "_mm_dense",
    "fragmented_grouped": "_mm_grouped",
    "all_base": None,
}


def _segments(slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """The sgmv metadata vLLM builds (compute_meta): unique_consecutive of the slots."""
    index = torch.tensor(slots, dtype=torch.long)
    seg_slots, seg_lens = torch.unique_consecutive(index, return_counts=True)
    starts = torch.zeros_like(seg_lens)
    starts[1:] = torch.cumsum(seg_lens, 0)[:-1]
    return (
        starts,
        seg_lens,
        seg_slots,
        int(seg_slots.numel()),
        int(seg_lens.max()),
        int(seg_lens.sum()),
    )


def _reference(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    slots: list[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-token einsum in float64 on the out-dtype-cast operands; zero rows for -1."""
    w = weights.squeeze(1) if weights.dim() == 4 else weights
    x = inputs.to(out_dtype).double()
    w64 = w.to(out_dtype).double()
    rows = []
    for t, slot in enumerate(slots):
        if slot < 0:
            rows.append(torch.zeros(w.shape[1], dtype=torch.float64))
        else:
            rows.append(torch.einsum("i,oi->o", x[t], w64[slot]))
    return torch.stack(rows)


def _tolerance(dtype: torch.dtype) -> dict[str, Any]:
    # bf16 keeps 8 mantissa bits; products are rounded to bf16 once (ours) or twice
    # (upstream: the matmul result, then the add).
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 5e-2}
    return {"rtol": 1e-4, "atol": 1e-4}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **_tolerance(dtype))


@pytest.fixture
def path_spy(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> list[str]:
    """Records which strategy functions of the kernels ran (and sets up "_grouped" cases)."""
    if str(request.node.callspec.params.get("pattern", "")).endswith("_grouped"):
        monkeypatch.setattr(kernels, "_DENSE_MAX_MACS", 0)
    taken: list[str] = []
    for name in ("_mm_runs", "_mm_dense", "_mm_grouped"):
        original: Callable[..., None] = getattr(kernels, name)

        def spy(*args: Any, _name: str = name, _orig: Callable[..., None] = original) -> None:
            taken.append(_name)
            _orig(*args)

        monkeypatch.setattr(kernels, name, spy)
    return taken


def _check_path(taken: list[str], pattern: str) -> None:
    expected = EXPECTED_PATH[pattern]
    assert taken == ([] if expected is None else [expected])


# ----------------------------------------------------------------------------- shrink


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize(
    ("in_dtype", "w_dtype", "out_dtype"),
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),  # vLLM: fp32 buffer
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.float32),  # weights differ from input
    ],
)
@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
def test_shrink_matches_reference(
    path_spy: list[str],
    pattern: str,
    rank: int,
    in_dtype: torch.dtype,
    w_dtype: torch.dtype,
    out_dtype: torch.dtype,
    form: str,
) -> None:
    slots = PATTERNS[pattern]
    gen = torch.Generator().manual_seed(rank * 1000 + len(slots))
    x = torch.randn(len(slots), HIDDEN, generator=gen).to(in_dtype)
    w = (torch.randn(SLOTS, 1, rank, HIDDEN, generator=gen) / HIDDEN**0.5).to(w_dtype)
    # extra columns and garbage contents: only [:, :rank] is written, all of it
    out = torch.full((len(slots), rank + 3), 7.0, dtype=out_dtype)
    scaling = 0.5
    if form == "bgmv":
        ops.bgmv_shrink(x, w, out, torch.tensor(slots), scaling)
    else:
        ops.sgmv_shrink(x, w, out, *_segments(slots), scaling)
    expected = _reference(x, w, slots, out_dtype) * scaling
    _assert_close(out[:, :rank], expected, out_dtype)
    assert torch.all(out[:, rank:] == 7.0)
    _check_path(path_spy, pattern)


# ----------------------------------------------------------------------------- expand


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
def test_expand_matches_reference(
    path_spy: list[str],
    pattern: str,
    rank: int,
    dtype: torch.dtype,
    add_inputs: bool,
    form: str,
) -> None:
    slots = PATTERNS[pattern]
    gen = torch.Generator().manual_seed(rank * 1000 + len(slots) + 1)
    x = torch.randn(len(slots), rank, generator=gen)  # the fp32 shrink buffer
    w = (torch.randn(SLOTS, 1, OUT, rank, generator=gen) / rank**0.5).to(dtype)
    start = torch.randn(len(slots), OUT, generator=gen).to(dtype)
    out = start.clone()
    if form == "bgmv":
        ops.bgmv_expand(x, w, out, torch.tensor(slots), add_inputs)
    else:
        ops.sgmv_expand(x, w, out, *_segments(slots), add_inputs)
    delta = _reference(x, w, slots, dtype)
    expected = start.double() + delta if add_inputs else delta
    _assert_close(out, expected, dtype)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    if add_inputs:  # a base row must come out bit-identical
        assert torch.equal(out[base_rows], start[base_rows])
    else:
        assert torch.all(out[base_rows] == 0)
    _check_path(path_spy, pattern)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
def test_expand_slice_matches_reference(
    path_spy: list[str],
    pattern: str,
    rank: int,
    dtype: torch.dtype,
    add_inputs: bool,
    form: str,
) -> None:
    slots = PATTERNS[pattern]
    offset, size, total = 24, OUT, OUT + 40
    gen = torch.Generator().manual_seed(rank * 1000 + len(slots) + 2)
    x = torch.randn(len(slots), rank, generator=gen)
    w = (torch.randn(SLOTS, 1, size, rank, generator=gen) / rank**0.5).to(dtype)
    start = torch.randn(len(slots), total, generator=gen).to(dtype)
    out = start.clone()
    if form == "bgmv":
        ops.bgmv_expand_slice(x, w, out, torch.tensor(slots), offset, size, add_inputs)
    else:
        ops.sgmv_expand_slice(x, w, out, *_segments(slots), offset, size, add_inputs)
    delta = _reference(x, w, slots, dtype)
    expected = start.double().clone()
    if add_inputs:
        expected[:, offset : offset + size] += delta
    else:
        expected[:, offset : offset + size] = delta
    _assert_close(out, expected, dtype)
    # outside the slice nothing moves, bit for bit
    assert torch.equal(out[:, :offset], start[:, :offset])
    assert torch.equal(out[:, offset + size :], start[:, offset + size :])
    _check_path(path_spy, pattern)


def test_three_dimensional_weights_are_accepted() -> None:
    slots = [1, -1, 0]
    x = torch.randn(3, HIDDEN)
    w = torch.randn(SLOTS, 16, HIDDEN)
    out = torch.zeros(3, 16)
    ops.bgmv_shrink(x, w, out, torch.tensor(slots), 1.0)
    _assert_close(out, _reference(x, w, slots, torch.float32), torch.float32)


def test_slot_past_the_end_raises_like_upstream() -> None:
    x = torch.randn(2, HIDDEN)
    w = torch.randn(SLOTS, 1, 16, HIDDEN)
    with pytest.raises(IndexError):
        upstream.bgmv_shrink(x, w, torch.zeros(2, 16), torch.tensor([0, SLOTS]), 1.0)
    with pytest.raises(IndexError):
        ops.bgmv_shrink(x, w, torch.zeros(2, 16), torch.tensor([0, SLOTS]), 1.0)


# ------------------------------------------------------------------- against upstream


def _no_base_slots(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    # sorted into runs like a real batch, plus a few interleaved rows
    slots = sorted(torch.randint(0, SLOTS, (n,), generator=gen).tolist())
    if n >= 4:
        slots[1], slots[-2] = slots[-2], slots[1]
    return slots


@pytest.mark.parametrize("n", [1, 6, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_six_ops_equal_upstream_without_base_rows(n: int, dtype: torch.dtype) -> None:
    slots = _no_base_slots(n, seed=n)
    idx = torch.tensor(slots)
    seg = _segments(slots)
    rank, total, offset = 16, OUT + 16, 8
    gen = torch.Generator().manual_seed(n + 17)
    x = torch.randn(n, HIDDEN, generator=gen).to(dtype)
    wa = (torch.randn(SLOTS, 1, rank, HIDDEN, generator=gen) / HIDDEN**0.5).to(dtype)
    wb = (torch.randn(SLOTS, 1, OUT, rank, generator=gen) / rank**0.5).to(dtype)
    buf = torch.randn(n, rank, generator=gen)
    y0 = torch.randn(n, total, generator=gen).to(dtype)

    def both(
        name: str, inputs: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *args: Any
    ) -> None:
        mine, theirs = out.clone(), out.clone()
        getattr(ops, name)(inputs, w, mine, *args)
        getattr(upstream, name)(inputs, w, theirs, *args)
        _assert_close(mine, theirs, dtype)

    for add in (True, False):
        both("bgmv_expand", buf, wb, y0[:, :OUT], idx, add)
        both("sgmv_expand", buf, wb, y0[:, :OUT], *seg, add)
        both("bgmv_expand_slice", buf, wb, y0, idx, offset, OUT, add)
        both("sgmv_expand_slice", buf, wb, y0, *seg, offset, OUT, add)
    both("bgmv_shrink", x, wa, torch.zeros(n, rank), idx, 0.25)
    both("sgmv_shrink", x, wa, torch.zeros(n, rank), *seg, 0.25)


def test_expand_padding_and_broadcast_corner_cases_equal_upstream() -> None:
    # adapter wider than the output (vocab padding): only the common columns
    x = torch.randn(3, 8)
    w = torch.randn(SLOTS, 1, OUT + 8, 8)
    idx = torch.tensor([0, 2, 1])
    mine = torch.randn(3, OUT)
    theirs = mine.clone()
    ops.bgmv_expand(x, w, mine, idx, True)
    upstream.bgmv_expand(x, w, theirs, idx, True)
    _assert_close(mine, theirs, torch.float32)
    # one input row broadcast onto every output row (upstream's `limit = 1`)
    one = torch.randn(1, 8)
    mine = torch.randn(4, OUT)
    theirs = mine.clone()
    ops.bgmv_expand(one, w, mine, torch.tensor([3]), True)
    upstream.bgmv_expand(one, w, theirs, torch.tensor([3]), True)
    _assert_close(mine, theirs, torch.float32)


def test_upstream_gives_base_rows_the_last_slot() -> None:
    """The bug itself: a -1 row gets slot SLOTS-1 from upstream, nothing from ours."""
    slots = [0, -1]
    x = torch.randn(2, HIDDEN)
    w = torch.randn(SLOTS, 1, 16, HIDDEN)
    theirs, mine = torch.zeros(2, 16), torch.zeros(2, 16)
    upstream.bgmv_shrink(x, w, theirs, torch.tensor(slots), 1.0)
    ops.bgmv_shrink(x, w, mine, torch.tensor(slots), 1.0)
    _assert_close(theirs[1], w[SLOTS - 1, 0] @ x[1], torch.float32)
    assert torch.all(mine[1] == 0)


# ----------------------------------------------------------------------------- probe


def test_probe_detects_upstream_bug() -> None:
    assert ops.upstream_bug_present(upstream.bgmv_shrink) is True


def test_probe_passes_our_op() -> None:
    assert ops.upstream_bug_present(ops.bgmv_shrink) is False


# ----------------------------------------------------------------------------- install


def _fake_modules() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    punica = types.ModuleType("fake.punica_cpu")
    torch_ops = types.ModuleType("fake.torch_ops")
    for name in ops.OPS:
        setattr(punica, name, getattr(upstream, name))
        setattr(torch_ops, name, getattr(upstream, name))
    punica.unrelated = len  # type: ignore[attr-defined]
    utils = types.ModuleType("fake.layers_utils")
    utils._get_lora_device = _upstream_like_get_lora_device  # type: ignore[attr-defined]
    return punica, torch_ops, utils


def _upstream_like_get_lora_device(base_layer: torch.nn.Module) -> torch.device:
    # vLLM 0.32.0's first branch, which is the one that crashes on `weight = None`
    if hasattr(base_layer, "weight"):
        # nn.Module's __getattr__ types it Tensor | Module; here the crash on None is the point
        device: torch.device = base_layer.weight.device  # type: ignore[assignment]
        return device
    raise ValueError(f"Unsupported base layer: {base_layer}")


def test_install_patches_every_binding_and_is_idempotent() -> None:
    punica, torch_ops, utils = _fake_modules()
    done = bind_fixes(punica, [utils], extra_op_modules=[torch_ops])
    assert sorted(done) == sorted(
        [f"fake.punica_cpu.{n}" for n in ops.OPS]
        + [f"fake.torch_ops.{n}" for n in ops.OPS]
        + ["fake.layers_utils._get_lora_device"]
    )
    for name, ours in ops.OPS.items():
        assert getattr(punica, name) is ours
        assert getattr(torch_ops, name) is ours
    assert punica.unrelated is len
    wrapper = utils._get_lora_device
    assert wrapper is not _upstream_like_get_lora_device
    assert wrapper.__wrapped__ is _upstream_like_get_lora_device

    assert bind_fixes(punica, [utils], extra_op_modules=[torch_ops]) == []
    assert utils._get_lora_device is wrapper  # not wrapped twice
    assert punica.bgmv_shrink is ops.bgmv_shrink


def test_install_shares_one_wrapper_across_importers() -> None:
    utils, base_linear = types.ModuleType("u"), types.ModuleType("b")
    utils._get_lora_device = _upstream_like_get_lora_device  # type: ignore[attr-defined]
    base_linear._get_lora_device = _upstream_like_get_lora_device  # type: ignore[attr-defined]
    assert bind_fixes(None, [utils, base_linear]) == [
        "u._get_lora_device",
        "b._get_lora_device",
    ]
    assert utils._get_lora_device is base_linear._get_lora_device


def test_install_without_punica_leaves_ops_alone() -> None:
    punica, torch_ops, utils = _fake_modules()
    assert bind_fixes(None, [utils], extra_op_modules=[torch_ops]) == [
        "fake.layers_utils._get_lora_device"
    ]
    assert punica.bgmv_shrink is upstream.bgmv_shrink
    assert torch_ops.bgmv_shrink is upstream.bgmv_shrink


def test_install_skips_an_op_whose_signature_changed() -> None:
    punica, _, _ = _fake_modules()

    def bgmv_shrink(inputs: torch.Tensor, weights: torch.Tensor) -> None:  # a "new" API
        raise AssertionError("never called")

    punica.bgmv_shrink = bgmv_shrink  # type: ignore[attr-defined]
    done = bind_fixes(punica)
    assert "fake.punica_cpu.bgmv_shrink (skipped: signature differs from vLLM 0.32.0)" in done
    assert punica.bgmv_shrink is bgmv_shrink
    assert punica.bgmv_expand is ops.bgmv_expand


# -------------------------------------------------------------------------- device fix


class _W8A8Like(torch.nn.Module):
    """What the CPU int8 W8A8 kernel leaves behind: weight None, scales kept."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(4, 4, device=device), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.empty(4, 1, device=device))
        self.weight = None  # type: ignore[assignment]


def test_device_fix_falls_back_when_weight_is_none() -> None:
    layer = _W8A8Like("meta")  # meta: a device no default could produce by accident
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'device'"):
        _upstream_like_get_lora_device(layer)
    fixed = device.make_lora_device_fix(_upstream_like_get_lora_device)
    assert fixed(layer) == torch.device("meta")


def test_device_fix_keeps_upstream_answer_when_it_has_one() -> None:
    calls: list[torch.nn.Module] = []

    def original(base_layer: torch.nn.Module) -> torch.device:
        calls.append(base_layer)
        return torch.device("meta")

    layer = torch.nn.Linear(2, 2)  # on cpu: the wrapper must not second-guess upstream
    assert device.make_lora_device_fix(original)(layer) == torch.device("meta")
    assert calls == [layer]


def test_lora_device_lookup_order_and_fallbacks() -> None:
    packed = torch.nn.Module()
    packed.weight = None  # type: ignore[assignment]
    packed.register_buffer("other", torch.empty(1))
    packed.weight_packed = torch.nn.Parameter(torch.empty(2, device="meta"))
    assert device.lora_device(packed) == torch.device("meta")  # before the buffer

    buffers_only = torch.nn.Module()
    buffers_only.weight = None  # type: ignore[assignment]
    buffers_only.register_buffer("scale", torch.empty(1, device="meta"))
    assert device.lora_device(buffers_only) == torch.device("meta")

    with pytest.raises(ValueError, match="Unsupported base layer"):
        device.lora_device(torch.nn.Module())


def test_device_fix_repairs_real_vllm_get_lora_device() -> None:
    utils = pytest.importorskip("vllm.lora.layers.utils")
    original = utils._get_lora_device
    if ops.is_ours(original) or device.is_device_fix(original):
        pytest.skip("already patched in this process")
    layer = _W8A8Like("meta")
    with pytest.raises(AttributeError):
        original(layer)
    assert device.make_lora_device_fix(original)(layer) == torch.device("meta")


# ------------------------------------------------------- through vLLM's punica wrapper


def _wrapper_case(
    monkeypatch: pytest.MonkeyPatch, patch_ops: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_lora_linear + add_lora_logits of vLLM's PunicaWrapperCPU on a mixed batch.

    Requests: base (3 tokens), adapter id 5 (2), adapter id 7 (4), base (1); slots:
    id 5 -> 0, id 7 -> 2, and slot 3 (the last) holds an adapter nobody asked for.
    Returns (y_before, y_after, logits_before, logits_after, token_slots).
    """
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    layer_utils = pytest.importorskip("vllm.lora.layers.utils")
    if patch_ops:
        for name, op in ops.OPS.items():
            monkeypatch.setattr(punica_cpu, name, op)
    wrapper = punica_cpu.PunicaWrapperCPU(64, 8, "cpu")
    mapping = layer_utils.LoRAMapping(
        index_mapping=(0, 0, 0, 5, 5, 7, 7, 7, 7, 0),
        prompt_mapping=(0, 5, 7, 0),
        is_prefill=True,  # as vLLM V1 always does: the sgmv ops
    )
    wrapper.update_metadata(mapping, [5, None, 7, 9], 4, 100)
    gen = torch.Generator().manual_seed(3)
    rank, slices = 8, (48, 16, 16)
    x = torch.randn(10, HIDDEN, generator=gen).bfloat16()
    lora_a = tuple(torch.randn(4, 1, rank, HIDDEN, generator=gen).bfloat16() for _ in slices)
    lora_b = tuple(torch.randn(4, 1, n, rank, generator=gen).bfloat16() for n in slices)
    y0 = torch.randn(10, sum(slices), generator=gen).bfloat16()
    y = y0.clone()
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 0.5, slices)
    # logits: bgmv with the per-request sampler indices
    xs = torch.randn(4, HIDDEN, generator=gen).bfloat16()
    la = torch.randn(4, 1, rank, HIDDEN, generator=gen).bfloat16()
    lb = torch.randn(4, 1, 100, rank, generator=gen).bfloat16()
    logits0 = torch.randn(4, 100, generator=gen).bfloat16()
    logits = logits0.clone()
    wrapper.add_lora_logits(logits, xs, la, lb, 0.5)
    # reference for both, in float64
    token_slots = [-1, -1, -1, 0, 0, 2, 2, 2, 2, -1]
    expected = y0.double().clone()
    col = 0
    for a, b, n in zip(lora_a, lora_b, slices, strict=True):
        for t, slot in enumerate(token_slots):
            if slot >= 0:
                h = (a[slot, 0].double() @ x[t].double()) * 0.5
                expected[t, col : col + n] += b[slot, 0].double() @ h
        col += n
    expected_logits = logits0.double().clone()
    for r, slot in enumerate([-1, 0, 2, -1]):
        if slot >= 0:
            h = (la[slot, 0].double() @ xs[r].double()) * 0.5
            expected_logits[r] += lb[slot, 0].double() @ h
    return y, expected, logits, expected_logits, torch.tensor(token_slots)


def test_punica_wrapper_with_our_ops_leaves_base_requests_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    y, expected, logits, expected_logits, _ = _wrapper_case(monkeypatch, patch_ops=True)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(logits.double(), expected_logits, rtol=2e-2, atol=0.5)
    base_rows = [0, 1, 2, 9]
    assert torch.equal(y[base_rows].double(), expected[base_rows])  # bit-identical
    assert torch.equal(logits[[0, 3]].double(), expected_logits[[0, 3]])


def test_punica_wrapper_with_upstream_ops_shows_the_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    y, expected, logits, expected_logits, _ = _wrapper_case(monkeypatch, patch_ops=False)
    base_rows = [0, 1, 2, 9]
    # upstream applied slot 3 (the last) to the base rows
    assert not torch.allclose(y[base_rows].double(), expected[base_rows], atol=0.5)
    assert not torch.allclose(logits[[0, 3]].double(), expected_logits[[0, 3]], atol=0.5)
