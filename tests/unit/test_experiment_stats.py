"""The experiment report's statistics against scipy's own, for known counts (to 1e-9),
and the sample-ratio-mismatch check."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from adapters_registry.experiments import Exposure, Feedback
from adapters_registry.records import Variant
from server.experiments.report import build_report, srm_check

ARMS = (Variant("pirate", 1, 50), Variant("formal", 1, 50))
TOL = 1e-9


def exposure(i: int, variant: str, **fields: Any) -> Exposure:
    row: dict[str, Any] = {
        "exposure_id": f"e{i}",
        "response_id": f"chatcmpl-{i}",
        "request_id": str(i),
        "alias": "bot",
        "variant": variant,
        "adapter": variant.split("@")[0],
        "version": 1,
        "content_digest": "d" * 64,
        "tenant": "a",
        "user_hash": f"u{i % 37}",
        "created_at": 1000.0 + i,
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "ttft_s": 0.01 * (i % 10 + 1),
        "latency_s": 0.1 * (i % 20 + 1),
        **fields,
    }
    return Exposure(**row)


def world(
    labels: dict[str, list[int]] | None = None, scores: dict[str, list[float]] | None = None
) -> tuple[list[Exposure], list[tuple[str, Feedback]]]:
    exposures, feedback = [], []
    i = 0
    for kind, outcomes in (("label", labels or {}), ("score", scores or {})):
        for variant, values in outcomes.items():
            for value in values:
                exposures.append(exposure(i, variant))
                f = Feedback(
                    exposure_id=f"e{i}",
                    metric="m",
                    label=int(value) if kind == "label" else None,
                    score=float(value) if kind == "score" else None,
                    created_at=0.0,
                    updated_at=0.0,
                )
                feedback.append((variant, f))
                i += 1
    return exposures, feedback


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=0, abs_tol=TOL)


def test_binary_intervals_and_two_proportion_z_test_equal_scipys() -> None:
    # control 120/400 positive, candidate 150/380
    labels = {"pirate@1": [1] * 120 + [0] * 280, "formal@1": [1] * 150 + [0] * 230}
    report = build_report("bot", ARMS, *world(labels=labels))
    control, arm = (a["metrics"]["m"]["label"] for a in report["variants"])
    for block, (x, n) in ((control, (120, 400)), (arm, (150, 380))):
        ci = stats.binomtest(x, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert block["count"] == n and close(block["mean"], x / n)
        assert close(block["ci95"][0], ci.low) and close(block["ci95"][1], ci.high)
    versus = arm["vs_control"]
    p1, p0 = 150 / 380, 120 / 400
    pooled = 270 / 780
    z = (p1 - p0) / math.sqrt(pooled * (1 - pooled) * (1 / 380 + 1 / 400))
    assert close(versus["p_value"], 2 * stats.norm.sf(abs(z)))  # the z-test, by scipy's normal
    table = [[150, 230], [120, 280]]
    assert close(versus["p_value"], stats.chi2_contingency(table, correction=False).pvalue)
    q = stats.norm.ppf(0.975)
    se = math.sqrt(p1 * (1 - p1) / 380 + p0 * (1 - p0) / 400)
    assert close(versus["difference"], p1 - p0)
    assert close(versus["ci95"][0], p1 - p0 - q * se)
    assert close(versus["ci95"][1], p1 - p0 + q * se)
    assert close(versus["lift"], p1 / p0 - 1)
    lift_se = math.sqrt(p1 * (1 - p1) / (380 * p0**2) + p1**2 * p0 * (1 - p0) / (400 * p0**4))
    assert close(versus["lift_ci95"][0], p1 / p0 - 1 - q * lift_se)
    assert close(versus["lift_ci95"][1], p1 / p0 - 1 + q * lift_se)
    assert "vs_control" not in control


def test_score_intervals_and_welch_t_test_equal_scipys() -> None:
    rng = np.random.default_rng(7)
    a = list(rng.normal(3.0, 1.0, 250))
    b = list(rng.normal(3.3, 1.7, 180))
    report = build_report("bot", ARMS, *world(scores={"pirate@1": a, "formal@1": b}))
    control, arm = (v["metrics"]["m"]["score"] for v in report["variants"])
    for block, values in ((control, a), (arm, b)):
        x = np.asarray(values)
        low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert close(block["mean"], x.mean())
        assert close(block["ci95"][0], low) and close(block["ci95"][1], high)
    welch = stats.ttest_ind(b, a, equal_var=False)
    ci = welch.confidence_interval(0.95)
    versus = arm["vs_control"]
    assert versus["test"] == "Welch's t-test"
    assert close(versus["p_value"], welch.pvalue)
    assert close(versus["ci95"][0], ci.low) and close(versus["ci95"][1], ci.high)
    assert close(versus["difference"], float(np.mean(b) - np.mean(a)))


def test_per_arm_operational_numbers() -> None:
    rows = [exposure(i, "pirate@1") for i in range(100)]
    rows += [exposure(100 + i, "formal@1", status=500 if i < 5 else 200) for i in range(50)]
    report = build_report("bot", ARMS, rows, [])
    control, arm = report["variants"]
    assert (control["exposures"], arm["exposures"], arm["errors"]) == (100, 50, 5)
    assert close(arm["error_rate"], 0.1)
    assert control["users"] == 37  # distinct hashed users
    latencies = [r.latency_s for r in rows[:100]]
    assert close(control["latency_s"]["p50"], float(np.percentile(latencies, 50)))
    assert close(control["latency_s"]["p95"], float(np.percentile(latencies, 95)))
    ttfts = [r.ttft_s for r in rows[105:]]  # successful ones only
    assert close(arm["ttft_s"]["p95"], float(np.percentile(np.array(ttfts, dtype=float), 95)))
    assert (arm["prompt_tokens"], arm["completion_tokens"]) == (500, 250)


def test_named_control_and_arms_no_longer_configured() -> None:
    rows = [exposure(0, "pirate@1"), exposure(1, "formal@1"), exposure(2, "old@1")]
    report = build_report("bot", ARMS, rows, [], control="formal@1")
    assert report["control"] == "formal@1"
    assert [a["variant"] for a in report["variants"]] == ["pirate@1", "formal@1", "old@1"]
    assert report["variants"][2]["weight"] == 0
    with pytest.raises(ValueError, match="not an arm"):
        build_report("bot", ARMS, rows, [], control="nobody")


def test_srm_flags_60_40_of_a_50_50_split_and_not_a_fair_one() -> None:
    weights = {"pirate@1": 50, "formal@1": 50}
    skewed = srm_check({"pirate@1": 6000, "formal@1": 4000}, weights)
    assert skewed is not None and skewed["flagged"] is True
    assert close(skewed["p_value"], stats.chisquare([6000, 4000], [5000, 5000]).pvalue)
    fair = srm_check({"pirate@1": 5040, "formal@1": 4960}, weights)
    assert fair is not None and fair["flagged"] is False
    assert close(fair["p_value"], stats.chisquare([5040, 4960], [5000, 5000]).pvalue)
    # against unequal weights: 90/10 observed as 9,000/1,000 is fair
    assert srm_check({"a": 9000, "b": 1000}, {"a": 90, "b": 10})["flagged"] is False  # type: ignore[index]
    # an arm at weight 0 is not part of the check; one arm alone cannot mismatch
    assert srm_check({"a": 10, "b": 5}, {"a": 1, "b": 0}) is None


def test_degenerate_outcomes_give_no_false_numbers() -> None:
    report = build_report("bot", ARMS, *world(labels={"pirate@1": [0] * 10, "formal@1": [0] * 8}))
    versus = report["variants"][1]["metrics"]["m"]["label"]["vs_control"]
    assert versus["p_value"] == 1.0 and versus["difference"] == 0
    assert versus["lift"] is None  # relative to a control mean of 0
    one = build_report("bot", ARMS, *world(scores={"pirate@1": [1.0], "formal@1": [2.0, 3.0]}))
    assert one["variants"][0]["metrics"]["m"]["score"]["ci95"] is None
    assert one["variants"][1]["metrics"]["m"]["score"]["vs_control"] is None
