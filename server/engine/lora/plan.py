"""One plan per engine step: how the step's rows map to adapter slots.

The token -> slot mapping changes once per step, not per layer: the first LoRA layer
call after vLLM's ``update_metadata`` turns it into a plan (runs of rows sharing a slot;
for fragmented batches, gather/scatter index tensors) that every layer of that step
reuses (server/engine/lora/wrapper.py). Pure functions over tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import torch

from server.engine.lora.kernels import Run

__all__ = ["Grouped", "StepPlan", "plan_step"]

# Runs at least this long (prefill chunks, neighbouring requests of one adapter) are
# computed in place, one GEMM pair per run; single rows (decode) are gathered. Gathered
# rows are padded to the most rows any adapter of their class has: one 31-row prefill
# chunk among 16 one-row decodes made the class's batched GEMM 5x dearer (measured under
# per-customer load), so only single rows are gathered with others.
_LONG_RUN_ROWS: Final = 2


@dataclass(frozen=True)
class Grouped:
    """Rows gathered slot by slot into a padded ``[count, per, in]`` block.

    first / count: the members ``first .. first+count-1`` of a slot class (positions in
    its slot list; a member in that range with no rows here gets padding only); per:
    rows per member; gather: source row of every block
    row (padding repeats a real row: computed, never written back); valid: positions of
    the real rows in the block; dest: their rows in the output.
    """

    first: int
    count: int
    per: int
    gather: torch.Tensor
    valid: torch.Tensor
    dest: torch.Tensor


@dataclass(frozen=True)
class StepPlan:
    """How the rows of one engine step map to adapter slots, for every layer of the step.

    rows: the number of rows (tokens) the mapping covers.
    runs: runs of rows sharing a slot (>= 0) that are computed on their own (one GEMM
        pair on views each): a lone run (single-stream decode) and long runs (prefill
        chunks).
    scattered: single rows of adapters with no other single row here (decode rows of
        interleaved adapters), gathered with those of other adapters (one batched GEMM
        pair per class).
    spread: per adapter slot with several single rows apart (several requests of one
        adapter, interleaved with others'), those rows: gathered and computed on their
        own, which costs a few calls, where padding every other adapter of a class to
        their number would cost a GEMM that many times larger.
    Layers group slots differently (an adapter that targets q/v only has no weights in
    the MLP; see `server.engine.lora.pack.LayerPack`), so the gathered layout is made
    per slot class, once per step, and cached here.
    """

    rows: int
    runs: tuple[Run, ...]
    scattered: tuple[Run, ...]
    spread: tuple[tuple[int, torch.Tensor], ...] = ()
    _grouped: dict[tuple[int, ...], Grouped | None] = field(default_factory=dict)
    _slots: tuple[int, ...] | None = None

    @property
    def no_lora(self) -> bool:
        return not self.runs and not self.scattered and not self.spread

    @property
    def by_runs(self) -> bool:
        return not self.scattered and not self.spread

    @property
    def scattered_slots(self) -> tuple[int, ...]:
        """The distinct slots of the gathered rows, ascending."""
        if self._slots is None:
            object.__setattr__(self, "_slots", tuple(sorted({r[0] for r in self.scattered})))
        assert self._slots is not None
        return self._slots

    def grouped(self, members: tuple[int, ...]) -> Grouped | None:
        """The gathered layout of the scattered rows of these slots (None: none here)."""
        if members not in self._grouped:
            self._grouped[members] = _group(self.scattered, members)
        return self._grouped[members]


def plan_step(slots: Sequence[int]) -> StepPlan:
    """The plan for per-row slot indices (negative: no adapter)."""
    runs: list[Run] = []
    start = 0
    n = len(slots)
    for pos in range(1, n + 1):
        if pos == n or slots[pos] != slots[start]:
            if slots[start] >= 0:
                runs.append((slots[start], start, pos))
            start = pos
    long = [r for r in runs if r[2] - r[1] >= _LONG_RUN_ROWS]
    short = [r for r in runs if r[2] - r[1] < _LONG_RUN_ROWS]
    if len(short) <= 1:  # nothing worth a gather
        return StepPlan(n, tuple(runs), ())
    rows_of: dict[int, list[int]] = {}
    for slot, begin, stop in short:
        rows_of.setdefault(slot, []).extend(range(begin, stop))
    single = tuple(r for r in short if len(rows_of[r[0]]) == 1)
    spread = tuple(
        (slot, torch.tensor(rows, dtype=torch.long))
        for slot, rows in rows_of.items()
        if len(rows) > 1
    )
    return StepPlan(n, tuple(long), single, spread)


def _group(runs: Sequence[Run], members: tuple[int, ...]) -> Grouped | None:
    position = {slot: i for i, slot in enumerate(members)}
    rows_of: dict[int, list[int]] = {}
    for slot, begin, stop in runs:
        if slot in position:
            rows_of.setdefault(position[slot], []).extend(range(begin, stop))
    if not rows_of:
        return None
    first, last = min(rows_of), max(rows_of)
    per = max(len(r) for r in rows_of.values())
    gather: list[int] = []
    valid: list[int] = []
    dest: list[int] = []
    for member in range(first, last + 1):
        rows = rows_of.get(member, [])
        base = len(gather)
        valid.extend(range(base, base + len(rows)))
        dest.extend(rows)
        gather.extend(rows + [rows[0] if rows else dest[0]] * (per - len(rows)))

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return Grouped(first, last - first + 1, per, as_long(gather), as_long(valid), as_long(dest))
