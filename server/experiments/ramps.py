"""Ramps: a schedule of a candidate arm's share of an alias, taken while guardrails hold.

`PUT /admin/aliases/{name}/ramp` with a candidate arm, steps in percent of the traffic
(e.g. 1, 5, 25, 50, 100) and when to take the next one: every `every_exposures`
exposures of the alias (counted by this replica since the step began) and/or every
`every_s` seconds. The first step is applied at once. At each step the candidate gets
its percentage and the other arms share the rest in proportion to their weights then
(so a control/candidate pair goes 99/1, 95/5, ...); weights are set with the same
minimal-movement assignment as any weight change.

A step is taken only while the guardrails hold: if a guardrail has taken the candidate
out (weight 0), the ramp halts there and says so (`state: halted`, and a `ramp_halted`
row in the alias's audit trail next to the guardrail's own); every step taken is a
`ramp_step` row too. The last step in force makes the ramp `done`. `DELETE` stops a ramp
and leaves the weights as they are.

Steps are claimed in the database with a conditional update (`RampStore.advance`), so
of several replicas sharing it exactly one takes each step; the others pick the new
step up at their next look. A restart continues the ramp from its step (the exposure
count of the step starts again).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from adapters_registry.experiments import (
    ExperimentStore,
    Exposure,
    GuardrailEvent,
    RampRecord,
    RampStore,
)
from adapters_registry.records import AliasRecord, Variant
from adapters_registry.registry import Registry

log = logging.getLogger("loraswap.experiments")

# Weight units per percent: 1% of the traffic is a weight of 100 out of 10,000.
SCALE = 100


@dataclass(frozen=True)
class RampPlan:
    candidate: str
    steps: tuple[float, ...]  # percent of the traffic for the candidate, increasing
    every_exposures: int | None
    every_s: float | None

    @classmethod
    def of(cls, record: RampRecord) -> RampPlan:
        c = record.config
        return cls(
            candidate=str(c["candidate"]),
            steps=tuple(float(s) for s in c["steps"]),
            every_exposures=None if c.get("every_exposures") is None else int(c["every_exposures"]),
            every_s=None if c.get("every_s") is None else float(c["every_s"]),
        )

    def config(self) -> dict[str, object]:
        return {
            "candidate": self.candidate,
            "steps": list(self.steps),
            "every_exposures": self.every_exposures,
            "every_s": self.every_s,
        }


def weights_for(
    variants: tuple[Variant, ...], candidate: str, percent: float
) -> tuple[Variant, ...]:
    """The alias's variants with `percent` of the traffic on `candidate`, the rest shared by
    the other arms in proportion to their weights (equally if they all have 0)."""
    others = [v for v in variants if v.key != candidate]
    mine = round(percent * SCALE)
    rest = 100 * SCALE - mine
    total = sum(v.weight for v in others)
    out = []
    for v in variants:
        if v.key == candidate:
            weight = mine
        elif total > 0:
            weight = round(rest * v.weight / total)
        else:
            weight = rest // len(others)
        out.append(Variant(v.adapter, v.version, weight))
    return tuple(out)


class Ramps:
    def __init__(
        self,
        registry: Registry,
        store: RampStore,
        audit: ExperimentStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self.store = store
        self._audit = audit
        self._clock = clock
        self._ramps: dict[str, RampRecord] = {}
        self._counts: dict[str, int] = {}  # exposures of the alias since its step began
        self._busy: set[str] = set()  # aliases whose next step is being taken
        self._tasks: set[asyncio.Task[None]] = set()

    def load(self) -> None:
        self._ramps = {r.alias: r for r in self.store.all()}

    def get(self, alias: str) -> RampRecord | None:
        return self._ramps.get(alias)

    async def start(self, alias: AliasRecord, plan: RampPlan) -> RampRecord:
        """Apply the first step now and record the ramp (replacing any other)."""
        variants = weights_for(alias.variants, plan.candidate, plan.steps[0])
        await asyncio.to_thread(
            self._registry.put_alias, alias.name, variants, owner=alias.owner, shared=alias.shared
        )
        now = self._clock()
        record = await asyncio.to_thread(self.store.put, alias.name, plan.config(), now)
        if len(plan.steps) == 1:
            await asyncio.to_thread(self.store.advance, alias.name, 0, 0, "done", now)
            record = await self._reread(alias.name) or record
        self._ramps[alias.name] = record
        self._counts[alias.name] = 0
        await self._note(
            alias.name, plan.candidate, "ramp_step", {"step": 0, "percent": plan.steps[0]}
        )
        return record

    async def stop(self, alias: str) -> bool:
        gone = await asyncio.to_thread(self.store.delete, alias)
        self._ramps.pop(alias, None)
        self._counts.pop(alias, None)
        return gone

    # -- when to step --------------------------------------------------------------------

    def observe(self, exposure: Exposure) -> None:
        """An exposure listener: count it; past `every_exposures`, take the next step."""
        record = self._ramps.get(exposure.alias)
        if record is None or record.state != "running":
            return
        self._counts[exposure.alias] = self._counts.get(exposure.alias, 0) + 1
        plan = RampPlan.of(record)
        if (
            plan.every_exposures is not None
            and self._counts[exposure.alias] >= plan.every_exposures
        ):
            self._spawn(exposure.alias)

    async def tick(self) -> None:
        """Take the steps that are due by time, and pick up other replicas' changes."""
        await asyncio.to_thread(self.load)
        now = self._clock()
        for alias, record in list(self._ramps.items()):
            plan = RampPlan.of(record)
            due = plan.every_s is not None and now - record.step_started_at >= plan.every_s
            if record.state == "running" and due:
                self._spawn(alias)
        await self.settle()

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:  # the database away for a moment: look again next time
                log.exception("ramp round failed")

    async def settle(self) -> None:
        """Wait for the steps under way (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, alias: str) -> None:
        if alias in self._busy:
            return
        self._busy.add(alias)
        task = asyncio.get_running_loop().create_task(self._step(alias))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- taking a step ---------------------------------------------------------------------

    async def _step(self, name: str) -> None:
        try:
            await self._take_step(name)
        except Exception:
            log.exception("ramp of alias %s: the next step failed", name)
        finally:
            self._busy.discard(name)

    async def _take_step(self, name: str) -> None:
        record = self._ramps.get(name)
        alias = self._registry.alias(name)
        if record is None or record.state != "running":
            return
        plan = RampPlan.of(record)
        if alias is None or plan.candidate not in {v.key for v in alias.variants}:
            log.warning("ramp of alias %s: the alias or its candidate is gone; stopped", name)
            await self.stop(name)
            return
        now = self._clock()
        weights = {v.key: v.weight for v in alias.variants}
        if weights[plan.candidate] <= 0:
            # A guardrail took the candidate out: the ramp goes no further.
            if await asyncio.to_thread(
                self.store.advance, name, record.step, record.step, "halted", now
            ):
                await self._note(name, plan.candidate, "ramp_halted", {"step": record.step})
                log.warning(
                    "ramp of alias %s halted at step %d: %s has weight 0",
                    name,
                    record.step,
                    plan.candidate,
                )
            await self._reread(name)
            return
        nxt = record.step + 1
        state = "done" if nxt == len(plan.steps) - 1 else "running"
        if not await asyncio.to_thread(self.store.advance, name, record.step, nxt, state, now):
            # Another replica took it (or the ramp changed): follow the database.
            await self._reread(name)
            self._counts[name] = 0
            return
        variants = weights_for(alias.variants, plan.candidate, plan.steps[nxt])
        await asyncio.to_thread(
            self._registry.put_alias, name, variants, owner=alias.owner, shared=alias.shared
        )
        await self._reread(name)
        self._counts[name] = 0
        await self._note(
            name, plan.candidate, "ramp_step", {"step": nxt, "percent": plan.steps[nxt]}
        )
        log.info("ramp of alias %s: %s now at %s%%", name, plan.candidate, plan.steps[nxt])

    async def _reread(self, name: str) -> RampRecord | None:
        """This ramp as the database has it now (None: removed)."""
        fresh: RampRecord | None = await asyncio.to_thread(self.store.get, name)
        if fresh is None:
            self._ramps.pop(name, None)
        else:
            self._ramps[name] = fresh
        return fresh

    async def _note(self, alias: str, variant: str, rule: str, detail: dict[str, object]) -> None:
        """A row of the alias's audit trail (next to the guardrails' rollbacks)."""
        event = GuardrailEvent(
            event_id=uuid.uuid4().hex,
            alias=alias,
            variant=variant,
            rule=rule,
            detail=detail,
            created_at=self._clock(),
        )
        try:
            await asyncio.to_thread(self._audit.add_event, event)
        except Exception:
            log.exception("ramp audit row of alias %s not written", alias)
