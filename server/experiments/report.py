"""The statistics of an experiment report: per arm, against the control, and the SRM check.

Every distribution, test and interval is scipy's (scipy.stats), none is hand-rolled:

- a binary outcome (feedback `label`, 1 positive / 0 negative) per arm: the proportion
  and its Wilson 95% interval (`binomtest(...).proportion_ci(method="wilson")`);
  against the control, the two-proportion z-test (pooled), computed as scipy's
  chi-square test of the 2x2 table without continuity correction (the same p-value:
  chi2 = z^2), and the difference with its unpooled (Wald) 95% interval;
- a numeric outcome (feedback `score`) per arm: the mean and its t 95% interval;
  against the control, Welch's t-test (`ttest_ind(equal_var=False)`) and its interval
  of the difference;
- relative lift (arm / control - 1) with a delta-method 95% interval (normal quantile
  from scipy), when the control's mean is not 0;
- sample-ratio mismatch: the chi-square goodness-of-fit test of exposures per arm
  against the alias's configured weights (arms with a positive weight), flagged below
  p = 0.001: the split the users saw is not the one configured, so the comparison
  between arms is suspect (a bug in assignment, an arm failing before it is recorded,
  weights changed during the window...).

Error rate counts 5xx answers (what the arm may own); latency and TTFT percentiles are
over successful (200) exposures.

Shadow traffic (server/experiments/shadow.py), per shadow adapter: requests sampled, how
many ran, were dropped or failed; of the greedy ones that ran, how often the shadow's
tokens were the control's (with its Wilson interval); mean completion tokens and engine
latency of both sides over the runs.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from adapters_registry.experiments import Exposure, Feedback, ShadowRun
from adapters_registry.records import Variant

CONFIDENCE = 0.95
SRM_THRESHOLD = 0.001


def _num(value: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities (undefined statistics) become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(low: float | None, high: float | None) -> list[float | None] | None:
    low, high = _num(low), _num(high)
    return None if low is None or high is None else [low, high]


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return {"p50": _num(p50), "p95": _num(p95)}


def _z() -> float:
    return float(stats.norm.ppf(0.5 + CONFIDENCE / 2))


# -- one arm ---------------------------------------------------------------------------


def binary_summary(labels: Sequence[int]) -> dict[str, Any]:
    n, x = len(labels), int(sum(labels))
    if n == 0:
        return {"count": 0, "positives": 0, "mean": None, "ci95": None}
    ci = stats.binomtest(x, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"count": n, "positives": x, "mean": x / n, "ci95": _interval(ci.low, ci.high)}


def score_summary(scores: Sequence[float]) -> dict[str, Any]:
    n = len(scores)
    if n == 0:
        return {"count": 0, "mean": None, "std": None, "ci95": None}
    values = np.asarray(scores, dtype=float)
    mean = float(values.mean())
    if n < 2:
        return {"count": n, "mean": mean, "std": None, "ci95": None}
    sem = float(stats.sem(values))
    low, high = (
        stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
    )
    return {"count": n, "mean": mean, "std": _num(values.std(ddof=1)), "ci95": _interval(low, high)}


# -- an arm against the control -----------------------------------------------------------


def _lift(
    m1: float, m0: float, var1: float, n1: int, var0: float, n0: int
) -> tuple[float | None, list[float | None] | None]:
    """Relative lift m1/m0 - 1 and its delta-method interval (None when m0 is 0)."""
    if m0 == 0 or n1 == 0 or n0 == 0:
        return None, None
    ratio = m1 / m0
    se = math.sqrt(var1 / (n1 * m0**2) + (m1**2) * var0 / (n0 * m0**4))
    z = _z()
    return _num(ratio - 1), _interval(ratio - 1 - z * se, ratio - 1 + z * se)


def compare_binary(arm: Sequence[int], control: Sequence[int]) -> dict[str, Any] | None:
    """Two-proportion z-test of `arm` against `control` (labels 0/1)."""
    n1, n0 = len(arm), len(control)
    if n1 == 0 or n0 == 0:
        return None
    x1, x0 = int(sum(arm)), int(sum(control))
    p1, p0 = x1 / n1, x0 / n0
    table = [[x1, n1 - x1], [x0, n0 - x0]]
    if (x1 + x0) in (0, n1 + n0):
        p_value: float | None = 1.0 if p1 == p0 else None  # all equal: no evidence at all
    else:
        p_value = _num(stats.chi2_contingency(table, correction=False).pvalue)
    diff = p1 - p0
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    z = _z()
    lift, lift_ci = _lift(p1, p0, p1 * (1 - p1), n1, p0 * (1 - p0), n0)
    return {
        "test": "two-proportion z-test",
        "difference": diff,
        "ci95": _interval(diff - z * se, diff + z * se),
        "lift": lift,
        "lift_ci95": lift_ci,
        "p_value": p_value,
    }


def compare_scores(arm: Sequence[float], control: Sequence[float]) -> dict[str, Any] | None:
    """Welch's t-test of `arm` against `control`."""
    if len(arm) < 2 or len(control) < 2:
        return None
    a, b = np.asarray(arm, dtype=float), np.asarray(control, dtype=float)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(CONFIDENCE)
    m1, m0 = float(a.mean()), float(b.mean())
    lift, lift_ci = _lift(m1, m0, float(a.var(ddof=1)), len(a), float(b.var(ddof=1)), len(b))
    return {
        "test": "Welch's t-test",
        "difference": m1 - m0,
        "ci95": _interval(ci.low, ci.high),
        "lift": lift,
        "lift_ci95": lift_ci,
        "p_value": _num(result.pvalue),
    }


# -- sample-ratio mismatch ---------------------------------------------------------------


def srm_check(observed: dict[str, int], weights: dict[str, int]) -> dict[str, Any] | None:
    """Chi-square of exposures per arm against the configured weights (positive ones)."""
    arms = [key for key, weight in weights.items() if weight > 0]
    total = sum(observed.get(key, 0) for key in arms)
    if len(arms) < 2 or total == 0:
        return None
    counts = [observed.get(key, 0) for key in arms]
    weight_sum = sum(weights[key] for key in arms)
    expected = [total * weights[key] / weight_sum for key in arms]
    result = stats.chisquare(counts, f_exp=expected)
    p_value = float(result.pvalue)
    return {
        "test": "chi-square goodness of fit",
        "observed": dict(zip(arms, counts, strict=True)),
        "expected": dict(zip(arms, expected, strict=True)),
        "chi2": _num(result.statistic),
        "p_value": p_value,
        "threshold": SRM_THRESHOLD,
        "flagged": p_value < SRM_THRESHOLD,
    }


# -- shadow traffic ------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return _num(float(np.mean(known))) if known else None


def shadow_summary(runs: Sequence[ShadowRun]) -> list[dict[str, Any]]:
    """Per shadow adapter (as configured, in order of appearance): what its runs showed."""
    by_shadow: dict[str, list[ShadowRun]] = defaultdict(list)
    for r in runs:
        by_shadow[r.shadow].append(r)
    out = []
    for key, rows in by_shadow.items():
        ran = [r for r in rows if r.outcome == "run"]
        compared = [int(r.greedy_match) for r in ran if r.greedy_match is not None]
        matches = binary_summary(compared)
        out.append(
            {
                "shadow": key,
                "versions": sorted({f"{r.adapter}@{r.version}" for r in ran}),
                "sampled": len(rows),
                "runs": len(ran),
                "dropped": sum(1 for r in rows if r.outcome == "dropped"),
                "failed": sum(1 for r in rows if r.outcome == "failed"),
                "greedy_compared": matches["count"],
                "greedy_matches": matches["positives"],
                "match_rate": matches["mean"],
                "match_rate_ci95": matches["ci95"],
                "control": {
                    "completion_tokens_mean": _mean([r.control_tokens for r in ran]),
                    "latency_s_mean": _mean([r.control_latency_s for r in ran]),
                },
                "candidate": {
                    "completion_tokens_mean": _mean([r.shadow_tokens for r in ran]),
                    "latency_s_mean": _mean([r.shadow_latency_s for r in ran]),
                },
            }
        )
    return out


# -- the report ----------------------------------------------------------------------------


@dataclass
class _Outcomes:
    labels: list[int]
    scores: list[float]

    @staticmethod
    def by_metric_and_arm(
        feedback: Sequence[tuple[str, Feedback]],
    ) -> dict[tuple[str, str], _Outcomes]:
        """(metric, variant) -> the outcomes reported for it."""
        outcomes: dict[tuple[str, str], _Outcomes] = defaultdict(lambda: _Outcomes([], []))
        for variant, f in feedback:
            o = outcomes[(f.metric, variant)]
            if f.label is not None:
                o.labels.append(f.label)
            if f.score is not None:
                o.scores.append(f.score)
        return outcomes


def build_report(
    alias: str,
    variants: Sequence[Variant],
    exposures: Sequence[Exposure],
    feedback: Sequence[tuple[str, Feedback]],
    *,
    control: str | None = None,
    since: float | None = None,
    until: float | None = None,
    shadow_runs: Sequence[ShadowRun] = (),
) -> dict[str, Any]:
    """The report of `alias` over these exposures, their feedback and shadow runs (already
    windowed).

    Arms are the alias's configured variants, in order, then any arm seen in the window
    but no longer configured; the control is `control` or the first configured arm.
    Undefined statistics (no spread, too few outcomes) are None, never NaN.
    """
    # Degenerate samples (all equal, all 0) make numpy/scipy warn on their way to NaN,
    # which the report turns into None: nothing to warn about.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        order, control = _arms(alias, variants, exposures, control)
        by_arm: dict[str, list[Exposure]] = defaultdict(list)
        for e in exposures:
            by_arm[e.variant].append(e)
        outcomes = _Outcomes.by_metric_and_arm(feedback)
        metrics = sorted({metric for metric, _ in outcomes})
        weights = {v.key: v.weight for v in variants}
        arms = []
        for key in order:
            arm = _arm_summary(key, by_arm.get(key, []), weights.get(key, 0), key == control)
            arm["metrics"] = {m: _metric_block(m, key, control, outcomes) for m in metrics}
            arms.append(arm)
        return {
            "alias": alias,
            "since": since,
            "until": until,
            "control": control,
            "exposures": len(exposures),
            "variants": arms,
            "metrics": metrics,
            "srm": srm_check({key: len(by_arm.get(key, [])) for key in order}, weights),
            "shadow": shadow_summary(shadow_runs),
        }


def _arms(
    alias: str, variants: Sequence[Variant], exposures: Sequence[Exposure], control: str | None
) -> tuple[list[str], str | None]:
    """The arms in report order, and the control (checked to be one of them)."""
    order = [v.key for v in variants]
    for e in exposures:
        if e.variant not in order:
            order.append(e.variant)
    if control is None:
        return order, order[0] if order else None
    if control not in order:
        raise ValueError(f"control {control!r} is not an arm of alias {alias!r}: {order}")
    return order, control


def _arm_summary(
    key: str, rows: Sequence[Exposure], weight: float, is_control: bool
) -> dict[str, Any]:
    """One arm's traffic: exposures, users, errors, latency, tokens."""
    ok = [e for e in rows if e.status == 200]
    errors = sum(1 for e in rows if e.is_error)
    return {
        "variant": key,
        "weight": weight,
        "control": is_control,
        "exposures": len(rows),
        "users": len({e.user_hash for e in rows if e.user_hash is not None}),
        "errors": errors,
        "error_rate": errors / len(rows) if rows else None,
        "latency_s": _percentiles([e.latency_s for e in ok]),
        "ttft_s": _percentiles([e.ttft_s for e in ok if e.ttft_s is not None]),
        "prompt_tokens": sum(e.prompt_tokens for e in rows),
        "completion_tokens": sum(e.completion_tokens for e in rows),
        "metrics": {},
    }


def _metric_block(
    metric: str, key: str, control: str | None, outcomes: dict[tuple[str, str], _Outcomes]
) -> dict[str, Any]:
    """One arm's outcomes of one metric (labels and/or scores, as any arm reported them),
    and, but for the control, their comparison with the control's."""
    mine = outcomes.get((metric, key), _Outcomes([], []))
    base = outcomes.get((metric, control or ""), _Outcomes([], []))
    block: dict[str, Any] = {}
    if any(o.labels for (m, _), o in outcomes.items() if m == metric):
        block["label"] = binary_summary(mine.labels)
        if key != control:
            block["label"]["vs_control"] = compare_binary(mine.labels, base.labels)
    if any(o.scores for (m, _), o in outcomes.items() if m == metric):
        block["score"] = score_summary(mine.scores)
        if key != control:
            block["score"]["vs_control"] = compare_scores(mine.scores, base.scores)
    return block
