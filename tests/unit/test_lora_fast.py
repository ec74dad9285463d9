"""The step-planned CPU LoRA path (server/engine/lora/) against a plain reference.

The reference is the definition: for every row t with slot s >= 0 and every output slice
i, ``y[t, slice_i] += scale * x[t] @ A_i[s].T @ B_i[s].T``; rows with slot -1 untouched.
"""

from __future__ import annotations

import random
import types
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from server.engine.lora import ops, wrapper
from server.engine.lora.apply import apply_lora, scatter_add
from server.engine.lora.pack import build_pack
from server.engine.lora.patch import CpuLoraPatch, LoraImpl
from server.engine.lora.plan import plan_step
from server.engine.lora.wrapper import StepCache


def _reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    slots: Sequence[int],
    outs: Sequence[int],
    scale: float,
) -> torch.Tensor:
    want = y.clone().double()
    off = 0
    for ai, bi, width in zip(a, b, outs, strict=True):
        for t, s in enumerate(slots):
            if s >= 0:
                h = (x[t].double() @ ai[s, 0].double().T) * scale
                want[t, off : off + width] += h @ bi[s, 0, :width].double().T
        off += width
    return want


def _weights(
    rng: random.Random,
    num_slots: int,
    max_rank: int,
    hidden: int,
    outs: Sequence[int],
    dtype: torch.dtype,
    skip: float = 0.3,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """vLLM's stacked layout: zero-padded to max_rank, zero where a slot skips a slice."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    a = [torch.zeros(num_slots, 1, max_rank, hidden, dtype=dtype) for _ in outs]
    b = [torch.zeros(num_slots, 1, w, max_rank, dtype=dtype) for w in outs]
    for s in range(num_slots):
        for i, width in enumerate(outs):
            if rng.random() < skip:
                continue
            r = rng.choice([1, 4, max_rank])
            a[i][s, 0, :r] = torch.randn(r, hidden, generator=gen).to(dtype)
            b[i][s, 0, :, :r] = torch.randn(width, r, generator=gen).to(dtype)
    return a, b


def _slots(rng: random.Random, rows: int, num_slots: int, layout: str) -> list[int]:
    choices = list(range(-1, num_slots))
    if layout == "scattered":
        return [rng.choice(choices) for _ in range(rows)]
    out: list[int] = []
    while len(out) < rows:
        out += [rng.choice(choices)] * rng.randint(1, 80)
    return out[:rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["scattered", "runs"])
@pytest.mark.parametrize("seed", range(12))
def test_matches_the_reference(dtype: torch.dtype, layout: str, seed: int) -> None:
    rng = random.Random(seed)
    num_slots = rng.choice([1, 2, 4, 8])
    outs = rng.choice([[32], [32, 8, 8], [40, 40], [24, 16]])
    hidden = rng.choice([16, 48])
    rows = rng.choice([1, 3, 8, 16, 40, 130])
    a, b = _weights(rng, num_slots, rng.choice([8, 16, 64]), hidden, outs, dtype)
    slots = _slots(rng, rows, num_slots, layout)
    x = torch.randn(rows, hidden).to(dtype)
    y = torch.randn(rows, sum(outs)).to(dtype)
    scale = rng.choice([1.0, 0.5])
    want = _reference(y, x, a, b, slots, outs, scale)

    got = y.clone()
    apply_lora(got, x, build_pack(a, b, outs), plan_step(slots), scale)

    tol = 1e-4 if dtype == torch.float32 else 5e-2
    err = (got.double() - want).abs().max().item() / (want.abs().max().item() + 1.0)
    assert err < tol
    for t, s in enumerate(slots):  # base rows: bit for bit what they were
        if s < 0:
            assert torch.equal(got[t], y[t])


def test_a_slice_no_adapter_uses_between_used_ones() -> None:
    # q and v used, k (the middle slice) targeted by nobody: the output gap stays as is
    outs = [32, 8, 8]
    a = [torch.zeros(4, 1, 8, 16) for _ in outs]
    b = [torch.zeros(4, 1, w, 8) for w in outs]
    for s in range(4):
        for i in (0, 2):
            a[i][s, 0] = torch.randn(8, 16)
            b[i][s, 0] = torch.randn(outs[i], 8)
    slots = [0, 1, 2, 3, 0, 1, 2, 3]  # scattered: the gathered path
    plan = plan_step(slots)
    assert not plan.by_runs
    x, y = torch.randn(8, 16), torch.randn(8, 48)
    got = y.clone()
    apply_lora(got, x, build_pack(a, b, outs), plan, 1.0)
    assert torch.allclose(got.double(), _reference(y, x, a, b, slots, outs, 1.0), atol=1e-4)
    assert torch.equal(got[:, 32:40], y[:, 32:40])


def test_plan_runs_spread_and_groups() -> None:
    assert plan_step([-1, -1]).no_lora
    single = plan_step([-1, 2, 2, 2, -1])
    assert single.by_runs and single.runs == ((2, 1, 4),)
    prefill = plan_step([0] * 40 + [1] * 50 + [-1] * 5)
    assert prefill.by_runs and prefill.runs == ((0, 0, 40), (1, 40, 90))
    # a prefill chunk, even a short one, among decode rows: computed on its own; an
    # adapter with two decode rows apart: gathered on its own (spread); single rows grouped
    mixed = plan_step([0] * 5 + [1, 2, -1, 1, 3])
    assert mixed.runs == ((0, 0, 5),)
    assert mixed.scattered == ((2, 6, 7), (3, 9, 10))
    assert [(slot, rows.tolist()) for slot, rows in mixed.spread] == [(1, [5, 8])]
    assert not mixed.by_runs and mixed.scattered_slots == (2, 3)
    g = mixed.grouped((2, 3))
    assert g is not None and (g.first, g.count, g.per) == (0, 2, 1)
    assert sorted(g.dest.tolist()) == [6, 9]
    decode = plan_step([1, 3, 0, -1, 2, 4])
    grouped = decode.grouped((0, 1, 2, 3, 4))
    assert grouped is not None and (grouped.first, grouped.count, grouped.per) == (0, 5, 1)
    # a class without some slots: their rows are not in the layout; members are positions
    only = decode.grouped((2, 3))
    assert only is not None and sorted(only.dest.tolist()) == [1, 4]
    assert (only.first, only.count) == (0, 2)
    assert decode.grouped((5,)) is None
    spread_only = plan_step([1, 2, 1, 2])
    assert spread_only.scattered == () and not spread_only.no_lora
    assert [s for s, _ in spread_only.spread] == [1, 2]


def test_pack_trims_ranks_and_skips_untargeted_slices() -> None:
    outs = [16, 8]
    a = [torch.zeros(3, 1, 64, 12) for _ in outs]
    b = [torch.zeros(3, 1, w, 64) for w in outs]
    a[0][0, 0, :8] = 1.0  # slot 0: rank 8 on slice 0 only
    b[0][0, 0, :, :8] = 1.0
    a[0][2, 0, :4] = 1.0  # slot 2: rank 4 + rank 16
    a[1][2, 0, :16] = 1.0
    pack = build_pack(a, b, outs)
    assert pack.rank == (8, 0, 20)
    assert pack.has_weights == (True, False, True)
    alone = pack.alone(2)
    assert alone is not None and alone.a.shape == (12, 20)  # compact: not 2 x 64
    assert pack.alone(1) is None
    assert pack.parts[2] == ((0, 4, 0, 16), (4, 20, 16, 24))
    # slot 1 has no weights here: in no class
    assert sorted(s for c in pack.classes for s in c.slots) == [0, 2]


def test_slots_with_the_same_shapes_share_a_class_and_odd_ones_merge_when_cheap() -> None:
    hidden, outs = 2048, [2048, 256, 256]
    a = [torch.zeros(6, 1, 64, hidden) for _ in outs]
    b = [torch.zeros(6, 1, w, 64) for w in outs]
    for s in range(4):  # slots 0-3: rank 64 on every slice (a big all-linear adapter)
        for i in range(3):
            a[i][s, 0] = 1.0
    for s in (4, 5):  # slots 4-5: rank 56 on every slice: cheaper padded than apart
        for i in range(3):
            a[i][s, 0, :56] = 1.0
    pack = build_pack(a, b, outs)
    assert [c.slots for c in pack.classes] == [(0, 1, 2, 3, 4, 5)]
    for s in (4, 5):  # rank 64 on q only: padding k/v to 64 would read ~1 MB more
        a[0][s, 0, :] = 1.0
        a[1][s, 0, :] = 0.0
        a[2][s, 0, :] = 0.0
    big = build_pack(a, b, outs)
    assert [c.slots for c in big.classes] == [(0, 1, 2, 3), (4, 5)]
    assert big.classes[1].ranks == (64, 0, 0)


def test_a_pack_is_rebuilt_when_vllm_writes_a_slot() -> None:
    """vLLM loads an adapter into a slot with in-place copies: the version counters move."""
    outs = [8]
    a = (torch.zeros(2, 1, 8, 4),)
    b = (torch.zeros(2, 1, 8, 8),)
    cache = StepCache()
    first = cache.pack(a, b, outs)
    assert cache.pack(a, b, outs) is first
    a[0][1, 0, :2].copy_(torch.ones(2, 4))
    second = cache.pack(a, b, outs)
    assert second is not first and second.rank == (0, 2)


class _FakeWrapper:
    """The parts of vLLM's PunicaWrapperCPU that the fast path touches."""

    def __init__(self) -> None:
        self.no_lora = False
        self.indices = torch.tensor([0, -1, 1])
        self.fallbacks = 0

    @property
    def token_lora_indices(self) -> torch.Tensor:
        return self.indices

    def update_metadata(self, indices: list[int]) -> None:
        self.indices = torch.tensor(indices)
        self.no_lora = all(i < 0 for i in indices)

    def add_lora_linear(self, *args: Any, **kwargs: Any) -> None:
        self.fallbacks += 1

    def add_lora_logits(self, *args: Any, **kwargs: Any) -> None:
        self.logits_calls = getattr(self, "logits_calls", 0) + 1


Installed = tuple[type[_FakeWrapper], types.ModuleType, CpuLoraPatch]


@pytest.fixture
def installed() -> Installed:
    return _install()


def _install(base: type[_FakeWrapper] = _FakeWrapper) -> Installed:
    cls: type[_FakeWrapper] = type("Wrapper", (base,), {})
    cls.add_lora_linear = _FakeWrapper.add_lora_linear  # type: ignore[method-assign]
    cls.add_lora_logits = _FakeWrapper.add_lora_logits  # type: ignore[method-assign]
    module = types.ModuleType("fake_punica_cpu")
    upstream = {name: (lambda *a, **k: None) for name in ops.OPS}
    for name, fn in upstream.items():
        setattr(module, name, fn)
    patch = CpuLoraPatch.install(cls, module, fix_ops=True, fast=True)
    return cls, module, patch


def test_install_and_switch(installed: Installed) -> None:
    cls, module, patch = installed
    assert cls.add_lora_linear is wrapper.add_lora_linear
    assert all(getattr(module, n) is fn for n, fn in ops.OPS.items())
    assert patch.impl is LoraImpl.FAST
    patch.use(LoraImpl.UPSTREAM)
    assert cls.add_lora_linear is _FakeWrapper.add_lora_linear
    assert module.bgmv_shrink is not ops.bgmv_shrink
    patch.use(LoraImpl.OPS)
    assert module.bgmv_shrink is ops.bgmv_shrink
    # mypy keeps the narrowing of the first assert; use() changed the value since.
    assert patch.impl is LoraImpl.OPS  # type: ignore[comparison-overlap]
    with pytest.raises(ValueError, match="unknown"):
        patch.use(LoraImpl("turbo"))
    patch.use(LoraImpl.FAST)


def test_each_wrapper_class_keeps_its_own_patch() -> None:
    """No process-wide state of ours: the record of a patch lives on the class it patched."""
    (cls1, _, patch1), (cls2, module2, patch2) = _install(), _install()
    assert patch1 is not patch2
    assert CpuLoraPatch.of(cls1) is patch1 and CpuLoraPatch.of(cls2) is patch2
    assert CpuLoraPatch.of(_FakeWrapper) is None
    patch1.use(LoraImpl.UPSTREAM)
    assert cls1.add_lora_linear is _FakeWrapper.add_lora_linear
    assert cls2.add_lora_linear is wrapper.add_lora_linear
    assert module2.bgmv_shrink is ops.bgmv_shrink


def test_the_wrapper_replans_each_step_and_falls_back_on_odd_shapes(
    installed: Installed,
) -> None:
    cls, _, _ = installed
    w = cls()
    a = (torch.randn(2, 1, 4, 6),)
    b = (torch.randn(2, 1, 5, 4),)
    x, y = torch.randn(3, 6), torch.zeros(3, 5)
    w.add_lora_linear(y, x, a, b, 1.0, (5,))
    assert torch.equal(y[1], torch.zeros(5)) and y[0].abs().sum() > 0
    w.update_metadata([-1, -1, -1])
    y2 = torch.zeros(3, 5)
    w.add_lora_linear(y2, x, a, b, 1.0, (5,))  # no adapter in this step
    assert torch.equal(y2, torch.zeros(3, 5))
    w.update_metadata([1, 1, 1, 1])  # 4 mapped rows, 3 given: not ours to guess
    w.add_lora_linear(torch.zeros(3, 5), x, a, b, 1.0, (5,))
    assert w.fallbacks == 1


def test_a_second_install_changes_nothing(installed: Installed) -> None:
    cls, module, patch = installed
    update = cls.update_metadata
    assert CpuLoraPatch.install(cls, module, fix_ops=True, fast=True) is patch
    assert cls.update_metadata is update


@pytest.mark.parametrize(("lo", "hi"), [(0, 6), (2, 5), (0, 3)])
def test_scatter_add_full_and_partial_width(lo: int, hi: int) -> None:
    y = torch.randn(5, 6)
    rows = torch.randn(3, hi - lo)
    dest = torch.tensor([4, 0, 2])
    want = y.clone()
    want[dest, lo:hi] += rows
    scatter_add(y, lo, hi, dest, rows)
    assert torch.allclose(y, want)


def test_per_slice_expand_with_a_gap_when_weights_are_large() -> None:
    """Wide slices make the per-slice expand cheaper than the block-diagonal one."""
    outs = [512, 256, 512]
    a = [torch.zeros(2, 1, 64, 8) for _ in outs]
    b = [torch.zeros(2, 1, w, 64) for w in outs]
    for s in range(2):
        for i in (0, 2):
            a[i][s, 0] = torch.randn(64, 8)
            b[i][s, 0] = torch.randn(outs[i], 64) * 0.01
    slots = [0, 1, 0, 1, 0, 1]
    x, y = torch.randn(6, 8), torch.randn(6, sum(outs))
    pack = build_pack(a, b, outs)
    (cls,) = pack.classes
    assert cls.block is None and len(cls.b) == 2  # one expand GEMM per used slice
    got = y.clone()
    apply_lora(got, x, pack, plan_step(slots), 1.0)
    assert torch.allclose(got.double(), _reference(y, x, a, b, slots, outs, 1.0), atol=1e-4)
    assert torch.equal(got[:, 512:768], y[:, 512:768])


def test_logits_lora_runs_only_when_a_slot_has_lm_head_weights(installed: Installed) -> None:
    cls, _, patch = installed
    w = cls()
    a, b = torch.zeros(2, 1, 4, 6), torch.zeros(2, 1, 10, 4)
    y, x = torch.zeros(3, 10), torch.randn(3, 6)
    w.add_lora_logits(y, x, a, b, 1.0)
    assert getattr(w, "logits_calls", 0) == 0  # all zero: skipped
    b[1, 0, :, :2] = 1.0  # vLLM loads an lm_head adapter into slot 1 (version bump)
    a[1, 0, :2] = 1.0
    w.add_lora_logits(y, x, a, b, 1.0)
    assert w.logits_calls == 1
    patch.use(LoraImpl.OPS)
    assert cls.add_lora_logits is _FakeWrapper.add_lora_logits
    patch.use(LoraImpl.FAST)


# --------------------------------------------------------------------------- by adapter


class _VllmShaped(_FakeWrapper):
    """A fake wrapper whose update_metadata has vLLM 0.32.0's signature."""

    def update_metadata(  # type: ignore[override]
        self, mapping: list[int], lora_index_to_id: list[int | None], *rest: object
    ) -> None:
        self.indices = torch.tensor(mapping)
        self.no_lora = all(i < 0 for i in mapping)


def _vllm_wrapper() -> Any:
    cls, _, _ = _install(_VllmShaped)
    return cls()


def _load(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], slot: int, src: Sequence[torch.Tensor]
) -> None:
    """vLLM's activate_adapter: reset the slot, copy the adapter's weights in place."""
    for t in (*a, *b):
        t[slot].zero_()
    for i, (sa, sb) in enumerate(zip(src[0::2], src[1::2], strict=True)):
        a[i][slot, 0, : sa.shape[0]].copy_(sa)
        b[i][slot, 0, :, : sb.shape[1]].copy_(sb)


def test_adapters_are_copied_out_once_and_follow_their_slot() -> None:
    """Keyed by adapter id: a slot change copies only the newcomer, an adapter moved to
    another slot reuses what was copied, and results stay those of the reference."""
    w = _vllm_wrapper()
    outs, hidden, slots = [24, 8, 8], 16, 3
    gen = torch.Generator().manual_seed(7)
    adapters = {
        aid: [
            t
            for i, width in enumerate(outs)
            for t in (
                torch.randn(4 + 4 * (aid % 2), hidden, generator=gen),
                torch.randn(width, 4 + 4 * (aid % 2), generator=gen),
            )
        ]
        for aid in (11, 12, 13, 14)
    }
    a = tuple(torch.zeros(slots, 1, 8, hidden) for _ in outs)
    b = tuple(torch.zeros(slots, 1, width, 8) for width in outs)
    x = torch.randn(6, hidden)

    def step(layout: list[int | None], mapping: list[int]) -> None:
        w.update_metadata(mapping, layout, slots + 1, 100)
        y = torch.randn(6, sum(outs))
        got = y.clone()
        w.add_lora_linear(got, x, a, b, 1.0, tuple(outs))
        want = _reference(y, x, a, b, mapping, outs, 1.0)
        assert torch.allclose(got.double(), want, atol=1e-4)
        for t, s in enumerate(mapping):
            if s < 0:
                assert torch.equal(got[t], y[t])

    for slot, aid in enumerate((11, 12, 13)):
        _load(a, b, slot, adapters[aid])
    step([11, 12, 13], [0, 1, 2, -1, 1, 0])
    cache = wrapper.cache_of(w)
    (per_layer,) = cache.adapters.values()
    copied = dict(per_layer)
    assert set(copied) == {11, 12, 13}
    # 14 replaces 12 in slot 1; 11 and 13 swap slots
    _load(a, b, 1, adapters[14])
    _load(a, b, 0, adapters[13])
    _load(a, b, 2, adapters[11])
    step([13, 14, 11], [2, 1, 0, 0, -1, 1])
    assert per_layer[11] is copied[11] and per_layer[13] is copied[13]
    assert set(per_layer) == {11, 12, 13, 14}


def test_the_adapters_kept_are_bounded() -> None:
    w = _vllm_wrapper()
    a = (torch.zeros(2, 1, 4, 6),)
    b = (torch.zeros(2, 1, 5, 4),)
    x = torch.randn(2, 6)
    for aid in range(1, 20):
        _load(a, b, aid % 2, [torch.randn(4, 6), torch.randn(5, 4)])
        layout = [aid, aid - 1] if aid % 2 == 0 else [aid - 1, aid]
        w.update_metadata([0, 1], layout, 3, 100)
        w.add_lora_linear(torch.zeros(2, 5), x, a, b, 1.0, (5,))
    (per_layer,) = wrapper.cache_of(w).adapters.values()
    assert len(per_layer) <= 4 and {18, 19} <= set(per_layer)


def test_a_batch_of_forty_distinct_adapters_matches_the_reference() -> None:
    """Per-customer traffic: every decode row its own adapter, of mixed ranks and targets."""
    rng = random.Random(40)
    outs = [48, 16, 16]
    a, b = _weights(rng, 40, 16, 32, outs, torch.bfloat16, skip=0.2)
    slots = [*range(40), -1, -1]
    rng.shuffle(slots)
    x = torch.randn(len(slots), 32).to(torch.bfloat16)
    y = torch.randn(len(slots), sum(outs)).to(torch.bfloat16)
    layout = [1000 + s for s in range(40)]
    pack = build_pack(a, b, outs, layout, {})
    plan = plan_step(slots)
    got = y.clone()
    apply_lora(got, x, pack, plan, 0.5)
    want = _reference(y, x, a, b, slots, outs, 0.5)
    err = (got.double() - want).abs().max().item() / (want.abs().max().item() + 1.0)
    assert err < 5e-2
    for t, s in enumerate(slots):
        if s < 0:
            assert torch.equal(got[t], y[t])
    # only the adapters present are stacked: a step with 3 of them reads 3
    few = plan_step([5, -1, 9, 30])
    classes = pack.classes_for(few.scattered_slots)
    assert sorted(s for c in classes for s in c.slots) == [5, 9, 30]


def test_the_logits_lora_check_looks_at_each_adapter_once() -> None:
    """With the layout known, a slot change checks the newcomer's slot, not all slots."""
    w = _vllm_wrapper()
    a, b = torch.zeros(3, 1, 4, 6), torch.zeros(3, 1, 10, 4)
    y, x = torch.zeros(2, 10), torch.randn(2, 6)
    w.update_metadata([0, 1], [7, 8, None], 4, 10)
    w.add_lora_logits(y, x, a, b, 1.0)
    assert getattr(w, "logits_calls", 0) == 0
    b[2, 0, :, :2] = 1.0  # an lm_head adapter comes into slot 2
    a[2, 0, :2] = 1.0
    w.update_metadata([0, 2], [7, 8, 9], 4, 10)
    w.add_lora_logits(y, x, a, b, 1.0)
    assert w.logits_calls == 1
    assert wrapper.cache_of(w).logits_by_id[id(b)] == {7: False, 8: False, 9: True}
    w.update_metadata([0, 1], [7, 8, None], 4, 10)  # it leaves: skipped again
    w.add_lora_logits(y, x, a, b, 1.0)
    assert w.logits_calls == 1
