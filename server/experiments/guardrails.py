"""Guardrails: an alias arm that breaches a limit is taken out of the alias at once.

Limits are set per alias (`PUT /admin/aliases/{name}/guardrails`), all optional:

- `max_error_rate`: the arm's share of 5xx answers;
- `max_p95_latency_ratio`: the arm's p95 latency over the control's (successful answers);
- `metric` + `min_metric_ratio`: the arm's mean outcome of that feedback metric over the
  control's (label 1/0, else the score), e.g. 0.8 = "20% worse than the control";

each judged once the arm has `min_exposures` exposures (feedback outcomes, for the metric)
counted since the alias's weights were last set; the ratios also need that many of the
control's. On a breach the arm's weight goes to 0 at once (its users fall to the other
arms, with the least movement, as any weight change), an audit row records the rule, the
numbers and the time, `loraswap_guardrail_rollbacks` counts it and a warning is logged.
The control is never judged against itself, and the last arm with a weight is never
taken out. An operator restores weights explicitly (`PUT /admin/aliases/{name}`), which
starts a new window.

Each replica judges the traffic it served (in memory, from the exposure log's listener
and feedback as it is recorded); the weight change, in the shared registry, applies to
all. Feedback updates (a second outcome for the same response and metric) are not
counted again here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adapters_registry.experiments import ExperimentStore, Exposure, GuardrailEvent
from adapters_registry.records import AliasRecord, Variant
from adapters_registry.registry import Registry
from server.metrics import Metrics

log = logging.getLogger("loraswap.experiments")

# Latencies kept per arm for the p95 (the most recent ones).
_LATENCY_WINDOW = 1000


@dataclass(frozen=True)
class Limits:
    min_exposures: int = 100
    max_error_rate: float | None = None
    max_p95_latency_ratio: float | None = None
    metric: str | None = None
    min_metric_ratio: float | None = None
    control: str | None = None  # default: the alias's first variant

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Limits:
        return cls(**{k: v for k, v in config.items() if k in cls.__dataclass_fields__})


@dataclass
class _Arm:
    exposures: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))
    outcomes: int = 0
    outcome_sum: float = 0.0

    @property
    def p95(self) -> float | None:
        return float(np.percentile(list(self.latencies), 95)) if self.latencies else None


@dataclass
class _Window:
    """Counts of one alias since its weights were last set (its `updated_at`)."""

    updated_at: float
    arms: dict[str, _Arm] = field(default_factory=dict)

    def arm(self, key: str) -> _Arm:
        return self.arms.setdefault(key, _Arm())


class Guardrails:
    def __init__(self, registry: Registry, store: ExperimentStore, metrics: Metrics) -> None:
        self._registry = registry
        self.store = store
        self._metrics = metrics
        self._limits: dict[str, Limits] = {}
        self._windows: dict[str, _Window] = {}

    def load(self) -> None:
        """Read every alias's limits (at start)."""
        self._limits = {
            alias: Limits.from_config(config) for alias, config in self.store.guardrails().items()
        }

    def limits(self, alias: str) -> Limits | None:
        return self._limits.get(alias)

    async def set_limits(self, alias: str, limits: Limits | None) -> None:
        """Store (None: remove) an alias's limits, then apply them: a new window."""
        config = None if limits is None else asdict(limits)
        await asyncio.to_thread(self.store.put_guardrails, alias, config)
        if limits is None:
            self._limits.pop(alias, None)
        else:
            self._limits[alias] = limits
        self._windows.pop(alias, None)  # new limits, new window

    # -- what happened -------------------------------------------------------------------

    def _window(self, alias: AliasRecord) -> _Window:
        window = self._windows.get(alias.name)
        if window is None or window.updated_at != alias.updated_at:
            window = self._windows[alias.name] = _Window(alias.updated_at)
        return window

    def _live(self, name: str, variant: str) -> tuple[AliasRecord, Limits, _Window] | None:
        limits = self._limits.get(name)
        alias = self._registry.alias(name)
        if limits is None or alias is None:
            return None
        weights = {v.key: v.weight for v in alias.variants}
        if weights.get(variant, 0) <= 0:
            return None  # already out (a request that started before), or not an arm now
        return alias, limits, self._window(alias)

    def observe(self, exposure: Exposure) -> None:
        """An exposure listener (server/experiments/log.py): count it, judge its arm."""
        live = self._live(exposure.alias, exposure.variant)
        if live is None:
            return
        alias, limits, window = live
        arm = window.arm(exposure.variant)
        arm.exposures += 1
        if exposure.is_error:
            arm.errors += 1
        elif exposure.status == 200:
            arm.latencies.append(exposure.latency_s)
        self._judge(alias, limits, window, exposure.variant)

    def feedback(self, exposure: Exposure, metric: str, value: float) -> None:
        """A first outcome recorded for `exposure` under `metric`."""
        live = self._live(exposure.alias, exposure.variant)
        if live is None or live[1].metric != metric:
            return
        alias, limits, window = live
        arm = window.arm(exposure.variant)
        arm.outcomes += 1
        arm.outcome_sum += value
        self._judge(alias, limits, window, exposure.variant)

    # -- judging ---------------------------------------------------------------------------

    def _judge(self, alias: AliasRecord, limits: Limits, window: _Window, key: str) -> None:
        # A change of the control's numbers may put any other arm past a ratio.
        control = limits.control or alias.variants[0].key
        keys = [key] if key != control else [key, *(k for k in window.arms if k != key)]
        live = {v.key for v in alias.variants if v.weight > 0}
        for candidate in keys:
            if candidate not in live:
                continue
            breach = self._breach(alias, limits, window, candidate)
            if breach is not None:
                self._take_out(alias, candidate, *breach)
                return

    def _breach(
        self, alias: AliasRecord, limits: Limits, window: _Window, key: str
    ) -> tuple[str, dict[str, object]] | None:
        arm = window.arm(key)
        enough = limits.min_exposures
        if limits.max_error_rate is not None and arm.exposures >= enough:
            rate = arm.errors / arm.exposures
            if rate > limits.max_error_rate:
                return "error_rate", {
                    "error_rate": rate,
                    "errors": arm.errors,
                    "exposures": arm.exposures,
                    "limit": limits.max_error_rate,
                }
        control_key = limits.control or alias.variants[0].key
        if key == control_key:
            return None
        control = window.arm(control_key)
        if (
            limits.max_p95_latency_ratio is not None
            and len(arm.latencies) >= enough
            and len(control.latencies) >= enough
        ):
            mine, theirs = arm.p95, control.p95
            if mine is not None and theirs and mine / theirs > limits.max_p95_latency_ratio:
                return "p95_latency_ratio", {
                    "p95_latency_s": mine,
                    "control_p95_latency_s": theirs,
                    "ratio": mine / theirs,
                    "limit": limits.max_p95_latency_ratio,
                    "exposures": arm.exposures,
                }
        if (
            limits.metric is not None
            and limits.min_metric_ratio is not None
            and arm.outcomes >= enough
            and control.outcomes >= enough
        ):
            mine, theirs = arm.outcome_sum / arm.outcomes, control.outcome_sum / control.outcomes
            if theirs > 0 and mine / theirs < limits.min_metric_ratio:
                return "metric_ratio", {
                    "metric": limits.metric,
                    "mean": mine,
                    "control_mean": theirs,
                    "ratio": mine / theirs,
                    "limit": limits.min_metric_ratio,
                    "outcomes": arm.outcomes,
                }
        return None

    def _take_out(
        self, alias: AliasRecord, key: str, rule: str, numbers: dict[str, object]
    ) -> None:
        """Weight 0 for arm `key`, now. Synchronous on purpose: a rollback is rare, and
        until the registry has it every new request may still go to the failing arm."""
        variants = tuple(
            Variant(v.adapter, v.version, 0) if v.key == key else v for v in alias.variants
        )
        if sum(v.weight for v in variants) <= 0:
            log.warning(
                "guardrail %s breached by %s of alias %s, but it is the last arm with a "
                "weight: left in (%s)",
                rule,
                key,
                alias.name,
                numbers,
            )
            self._windows.pop(alias.name, None)  # judge it afresh, not on every request
            return
        try:
            self._registry.put_alias(alias.name, variants, owner=alias.owner, shared=alias.shared)
        except Exception:  # the registry away: the next exposure tries again
            log.exception("guardrail rollback of %s in alias %s failed", key, alias.name)
            return
        event = GuardrailEvent(
            event_id=uuid.uuid4().hex,
            alias=alias.name,
            variant=key,
            rule=rule,
            detail={**numbers, "weights_before": {v.key: v.weight for v in alias.variants}},
            created_at=time.time(),
        )
        try:
            self.store.add_event(event)
        except Exception:
            log.exception("guardrail audit row of %s in alias %s not written", key, alias.name)
        self._metrics.guardrail_rollbacks.labels(alias.name, key, rule).inc()
        log.warning(
            "guardrail %s: arm %s of alias %s set to weight 0 (%s)", rule, key, alias.name, numbers
        )
