"""The fast path's methods for vLLM's ``PunicaWrapperCPU`` (vLLM 0.32.0 signatures).

vLLM's ``PunicaWrapperCPU.add_lora_linear`` runs, for every LoRA layer call, one shrink
and one expand op per output slice (q/k/v are three, gate/up two), each of which works
out again which rows use which adapter slot, allocates fp32 buffers, and does one small
matmul per slot. On CPU the matmuls are tiny (rank 8-64) and what the step pays for is
per-call overhead: ~14 op calls per decoder layer, each tens of microseconds of Python
and oneDNN set-up, against a base layer that costs about as much (the measured effect is
in README, "Fast multi-LoRA on CPU").

Instead, `add_lora_linear` plans the step once (server/engine/lora/plan.py), copies each
adapter's weights out of vLLM's slots once per adapter (pack.py) and applies them with a few GEMMs
(apply.py); `add_lora_logits` skips the logits LoRA while no slot holds lm_head
weights. What they keep between calls lives on each wrapper instance (`StepCache`); the
patch (patch.py) binds them on the class and holds the originals they fall back to.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch

from server.engine.lora.apply import apply_lora
from server.engine.lora.pack import AdapterLayer, LayerPack, build_pack, versions
from server.engine.lora.plan import StepPlan, plan_step

if TYPE_CHECKING:
    from server.engine.lora.patch import CpuLoraPatch

__all__ = [
    "PATCH_ATTR",
    "StepCache",
    "WrapperMethods",
    "add_lora_linear",
    "add_lora_logits",
    "cache_of",
    "make_update_metadata",
]

# The attribute of the patched wrapper class that holds its `CpuLoraPatch`.
PATCH_ATTR: Final = "_loraswap_patch"
# The attribute of a wrapper instance that holds its `StepCache`.
_CACHE_ATTR: Final = "_loraswap_cache"

_LogitsKey = tuple[int, int, int]


class StepCache:
    """What the fast path keeps on one PunicaWrapperCPU between layer calls.

    plan: the current step's plan (None until the first layer call after
        ``update_metadata``); layout: per slot, the id of the adapter vLLM put there, as
        ``update_metadata`` last said (None: not said; packs then key slots by the
        tensors' version counters); packs: per layer (keyed by its first A tensor), the
        pack of the current layout; adapters: per layer, the adapters' weights copied
        out of the slots, by adapter id, kept for the adapters seen most recently (those
        in slots and as many again); logits: per lm_head LoRA tensor, whether any slot
        holds weights, against the tensors' version counters; logits_by_id: per lm_head
        LoRA tensor, whether each adapter (by id) has lm_head weights.
    """

    __slots__ = ("adapters", "layout", "logits", "logits_by_id", "packs", "plan", "recent")

    def __init__(self) -> None:
        self.plan: StepPlan | None = None
        self.layout: tuple[int | None, ...] | None = None
        self.packs: dict[int, LayerPack] = {}
        self.adapters: dict[int, dict[Hashable, AdapterLayer | None]] = {}
        self.recent: dict[int, None] = {}  # adapter ids, least recently in a slot first
        self.logits: dict[int, tuple[_LogitsKey, bool]] = {}
        self.logits_by_id: dict[int, dict[Hashable, bool]] = {}

    def step_plan(self, token_lora_indices: torch.Tensor) -> StepPlan:
        if self.plan is None:
            self.plan = plan_step(token_lora_indices.tolist())
        return self.plan

    def new_step(self, lora_index_to_id: Sequence[int | None] | None) -> None:
        """vLLM set a new token mapping (and maybe moved adapters): re-plan, and note
        which adapter id each slot holds now. vLLM requires adapter ids to be unique
        (``LoRARequest.lora_int_id``), and ours never reuse one for other weights
        (server/residency.py), so an id names the same weights wherever it sits."""
        self.plan = None
        if lora_index_to_id is None:
            return
        layout = tuple(lora_index_to_id)
        if layout == self.layout:
            return
        self.layout = layout
        for adapter_id in layout:
            if adapter_id is not None:
                self.recent.pop(adapter_id, None)
                self.recent[adapter_id] = None
        self._forget_beyond(2 * len(layout))

    def _forget_beyond(self, keep: int) -> None:
        """Drop what was copied out of the adapters least recently in a slot, past `keep`."""
        if len(self.recent) <= keep:
            return
        gone = list(self.recent)[: len(self.recent) - keep]
        for adapter_id in gone:
            del self.recent[adapter_id]
        per_adapter: list[dict[Hashable, Any]] = [
            *self.adapters.values(),
            *self.logits_by_id.values(),
        ]
        for cache in per_adapter:
            for adapter_id in gone:
                cache.pop(adapter_id, None)

    def pack(
        self,
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        output_slices: Sequence[int],
    ) -> LayerPack:
        """The layer's pack for the current slot layout (copying out new adapters only).

        Without a layout from vLLM, the pack is rebuilt whenever vLLM wrote any slot
        weights since the last one (the tensors' version counters)."""
        key = id(lora_a[0])
        pack = self.packs.get(key)
        if self.layout is not None and len(self.layout) <= lora_a[0].shape[0]:
            if pack is None or pack.layout != self.layout:
                known = self.adapters.setdefault(key, {})
                pack = self.packs[key] = build_pack(
                    lora_a, lora_b, output_slices, self.layout, known
                )
            return pack
        stamp = versions([*lora_a, *lora_b])
        if pack is None or not pack.layout or pack.layout[0] != (stamp, 0):
            pack = self.packs[key] = build_pack(lora_a, lora_b, output_slices)
        return pack

    def logits_weighted(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
        """Whether any slot of these lm_head LoRA tensors holds weights.

        With the slot layout known, each adapter's slot is looked at once (keyed by its id
        like the packs): the whole tensors are [slots, vocab, rank], ~50 MB at 32 slots for
        the demo model, and per-customer traffic changes a slot every few steps. Without
        it, the whole tensors, again whenever their version counters move."""
        layout = self.layout
        if layout is not None and len(layout) <= lora_b.shape[0]:
            return any(
                self._slot_weighted(lora_a, lora_b, slot, adapter_id)
                for slot, adapter_id in enumerate(layout)
                if adapter_id is not None
            )
        key = (id(lora_b), lora_a._version, lora_b._version)
        cached = self.logits.get(id(lora_b))
        if cached is None or cached[0] != key:
            cached = (key, bool(lora_b.any()) and bool(lora_a.any()))
            self.logits[id(lora_b)] = cached
        return cached[1]

    def _slot_weighted(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, slot: int, adapter_id: int
    ) -> bool:
        per_adapter = self.logits_by_id.setdefault(id(lora_b), {})
        found = per_adapter.get(adapter_id)
        if found is None:
            found = per_adapter[adapter_id] = bool(lora_b[slot].any()) and bool(lora_a[slot].any())
        return found


def cache_of(wrapper: object) -> StepCache:
    """The wrapper instance's `StepCache` (made on first use)."""
    cache: StepCache | None = getattr(wrapper, _CACHE_ATTR, None)
    if cache is None:
        cache = StepCache()
        setattr(wrapper, _CACHE_ATTR, cache)
    return cache


@dataclass(frozen=True)
class WrapperMethods:
    """PunicaWrapperCPU's methods as vLLM defined them (the fast path falls back to them)."""

    add_lora_linear: Callable[..., Any]
    add_lora_logits: Callable[..., Any] | None
    update_metadata: Callable[..., Any]


def _originals(wrapper: object) -> WrapperMethods:
    patch: CpuLoraPatch = getattr(wrapper, PATCH_ATTR)
    originals = patch.originals
    assert originals is not None  # these methods are bound only once they are saved
    return originals


def add_lora_linear(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[torch.Tensor, ...] | None = None,
    **kwargs: Any,
) -> None:
    """Drop-in for ``PunicaWrapperCPU.add_lora_linear`` (vLLM 0.32.0), same semantics."""
    if self.no_lora:
        return
    cache = cache_of(self)
    plan = cache.step_plan(self.token_lora_indices)
    y2 = y.view(-1, y.shape[-1])
    x2 = x.view(-1, x.shape[-1])
    if x2.shape[0] != plan.rows or y2.shape[0] != plan.rows:
        # Not the layout the plan describes (never seen with vLLM 0.32.0): stay correct.
        _originals(self).add_lora_linear(
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
            buffer=buffer, **kwargs,
        )  # fmt: skip
        return
    pack = cache.pack(lora_a_stacked, lora_b_stacked, output_slices)
    apply_lora(y2, x2, pack, plan, scale)


def add_lora_logits(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    scale: float,
    **kwargs: Any,
) -> Any:
    """``PunicaWrapperCPU.add_lora_logits``, skipped while no slot has lm_head weights.

    vLLM runs the logits LoRA for every step with an adapter request, although adapters
    that target lm_head are rare (our registry refuses them): a shrink and an expand
    over the whole vocabulary (49k x rank weights, ~6 MB read per step for the demo
    model at rank 64) that add zeros. Whether the slots hold any weights is cached
    against the tensors' version counters, like the layer packs.
    """
    if not cache_of(self).logits_weighted(lora_a_stacked, lora_b_stacked):
        return None
    original = _originals(self).add_lora_logits
    assert original is not None  # bound only where vLLM defines it
    return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)


def make_update_metadata(original: Callable[..., Any]) -> Callable[..., Any]:
    """``update_metadata`` that also starts a new step: the next layer call re-plans, and
    packs follow the adapters vLLM put in the slots."""

    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        # vLLM 0.32.0: update_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        ids = args[1] if len(args) > 1 else kwargs.get("lora_index_to_id")
        cache_of(self).new_step(ids if isinstance(ids, list | tuple) else None)
        return original(self, *args, **kwargs)

    update_metadata.__wrapped__ = original  # type: ignore[attr-defined]
    return update_metadata
