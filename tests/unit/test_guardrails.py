"""Guardrails: an arm that breaches a limit gets weight 0 at once, with an audit row, a
metric and a log line, while the other arm keeps serving; the operator restores it.
Real app, fake engine, both databases."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.experiments import Exposure
from server.engine.base import LoraHandle
from server.errors import EngineFailure
from server.experiments.guardrails import Guardrails
from server.metrics import Metrics
from tests.experiments import ADMIN, World, open_world
from tests.fakes import FakeEngine


class FailingEngine(FakeEngine):
    """Cannot load the adapter versions named in `broken` (as vLLM failing to load)."""

    def __init__(self, broken: set[str]) -> None:
        super().__init__()
        self.broken = broken

    async def add_lora(self, lora: LoraHandle) -> None:
        if lora.name in self.broken:
            raise EngineFailure(f"the engine could not load adapter {lora.name!r}")
        await super().add_lora(lora)


@pytest.fixture
def broken(tmp_path: Path, database: str | Path) -> Iterator[tuple[World, FailingEngine]]:
    engine = FailingEngine({"formal@1"})
    with open_world(tmp_path, database, engine=engine) as w:
        yield w, engine


def guard(world: World, **limits: Any) -> dict[str, Any]:
    r = world.c.put("/admin/aliases/bot/guardrails", json=limits, headers=ADMIN)
    assert r.status_code == 200, r.text
    got: dict[str, Any] = r.json()
    return got


def weights(world: World) -> dict[str, int]:
    got: dict[str, int] = world.c.get("/admin/aliases/bot", headers=ADMIN).json()["variants"]
    return got


def test_an_arm_that_fails_to_load_is_taken_out_within_min_exposures(
    broken: tuple[World, FailingEngine], caplog: pytest.LogCaptureFixture
) -> None:
    world, _ = broken
    guard(world, min_exposures=5, max_error_rate=0.5)
    outcomes: list[tuple[str, int]] = []
    with caplog.at_level(logging.WARNING, logger="loraswap.experiments"):
        for i in range(60):
            r = world.chat("a", user=f"user-{i}")
            outcomes.append((r.headers.get("x-alias-variant", "?"), r.status_code))
    failed = [(v, s) for v, s in outcomes if s != 200]
    # exactly the configured number of exposures of the failing arm (see below), 500s
    assert len(failed) == 5 and all(s == 500 for _, s in failed)
    last_failure = max(i for i, (_, s) in enumerate(outcomes) if s != 200)
    after = outcomes[last_failure + 1 :]
    assert len(after) >= 20 and all(s == 200 and v == "pirate@1" for v, s in after)
    assert all(s == 200 for v, s in outcomes if v == "pirate@1")  # 0 failed on the other arm
    assert weights(world) == {"pirate@1": 1, "formal@1": 0}

    audit = world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).json()
    (event,) = audit["events"]
    assert (event["variant"], event["rule"]) == ("formal@1", "error_rate")
    assert event["detail"]["errors"] == event["detail"]["exposures"] == 5
    assert event["detail"]["error_rate"] == 1.0 and event["detail"]["limit"] == 0.5
    assert event["detail"]["weights_before"] == {"pirate@1": 1, "formal@1": 1}
    assert time.time() - event["created_at"] < 120
    metrics: Metrics = world.app.state.metrics
    assert metrics.guardrail_rollbacks.labels("bot", "formal@1", "error_rate")._value.get() == 1
    assert any("formal@1 of alias bot set to weight 0" in m for m in caplog.messages)
    # the failing arm's exposures are in the log, with their 500s
    failing = [e for e in world.exposures() if e.variant == "formal@1"]
    assert [e.status for e in failing] == [500] * 5


def test_the_operator_restores_weights_and_a_new_window_starts(
    broken: tuple[World, FailingEngine],
) -> None:
    world, engine = broken
    guard(world, min_exposures=3, max_error_rate=0.5)
    for i in range(30):
        world.chat("a", user=f"user-{i}")
    assert weights(world)["formal@1"] == 0
    engine.broken.clear()  # fixed
    r = world.c.put(
        "/admin/aliases/bot",
        json={"variants": {"pirate@1": 1, "formal@1": 1}, "shared": True},
        headers=ADMIN,
    )
    assert r.status_code == 200
    statuses = [world.chat("a", user=f"user-{i}").status_code for i in range(30)]
    assert statuses == [200] * 30
    assert weights(world) == {"pirate@1": 1, "formal@1": 1}
    assert len(world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).json()["events"]) == 1


def test_negative_feedback_takes_an_arm_out(world_ok: World) -> None:
    world = world_ok
    guard(world, min_exposures=5, metric="thumbs", min_metric_ratio=0.5)
    for i in range(80):
        r = world.chat("a", user=f"user-{i}")
        variant = r.headers["x-alias-variant"]
        label = "positive" if variant == "pirate@1" else "negative"
        world.feedback("a", response_id=r.json()["id"], label=label, metric="thumbs")
        if weights(world)["formal@1"] == 0:
            break
    assert weights(world) == {"pirate@1": 1, "formal@1": 0}
    (event,) = world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).json()["events"]
    assert event["rule"] == "metric_ratio" and event["detail"]["outcomes"] >= 5
    assert event["detail"]["mean"] == 0 and event["detail"]["control_mean"] == 1


def _exposure(i: int, variant: str, latency_s: float) -> Exposure:
    return Exposure(
        exposure_id=f"x{i}",
        response_id=f"chatcmpl-x{i}",
        request_id=f"x{i}",
        alias="bot",
        variant=variant,
        adapter=variant.split("@")[0],
        version=1,
        content_digest="d" * 64,
        tenant=None,
        user_hash=None,
        created_at=time.time(),
        status=200,
        prompt_tokens=1,
        completion_tokens=1,
        ttft_s=None,
        latency_s=latency_s,
    )


def test_p95_latency_relative_to_the_control(world_ok: World) -> None:
    world = world_ok
    guard(world, min_exposures=20, max_p95_latency_ratio=1.5)
    guardrails: Guardrails = world.app.state.guardrails
    for i in range(19):
        guardrails.observe(_exposure(i, "pirate@1", 0.1))
        guardrails.observe(_exposure(100 + i, "formal@1", 0.4))
    assert weights(world)["formal@1"] == 1  # 19 each: not judged yet
    guardrails.observe(_exposure(19, "pirate@1", 0.1))
    guardrails.observe(_exposure(119, "formal@1", 0.4))
    assert weights(world) == {"pirate@1": 1, "formal@1": 0}
    (event,) = world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).json()["events"]
    assert event["rule"] == "p95_latency_ratio"
    assert event["detail"]["ratio"] == pytest.approx(4.0)


def test_the_control_is_not_judged_against_itself_and_the_last_arm_stays(
    broken: tuple[World, FailingEngine],
) -> None:
    world, engine = broken
    engine.broken = {"pirate@1", "formal@1"}
    guard(world, min_exposures=3, max_error_rate=0.5)
    for i in range(40):
        world.chat("a", user=f"user-{i}")
    # one of the two went first; the other, now the last arm with a weight, stays
    assert sorted(weights(world).values()) == [0, 1]
    assert len(world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).json()["events"]) == 1


def test_limits_survive_a_restart_and_can_be_removed(world_ok: World) -> None:
    world = world_ok
    guard(world, min_exposures=7, max_error_rate=0.2, control="formal@1")
    again = Guardrails(world.app.state.router.registry, world.app.state.exposures.store, Metrics())
    again.load()
    limits = again.limits("bot")
    assert limits is not None and (limits.min_exposures, limits.control) == (7, "formal@1")
    r = world.c.delete("/admin/aliases/bot/guardrails", headers=ADMIN)
    assert r.status_code == 200 and r.json()["limits"] is None
    assert world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/aliases/nobody/guardrails", {"max_error_rate": 0.1}, 404),
        ("/admin/aliases/bot/guardrails", {"min_exposures": 5}, 400),  # no limit
        ("/admin/aliases/bot/guardrails", {"max_error_rate": 2}, 400),
        ("/admin/aliases/bot/guardrails", {"metric": "thumbs"}, 400),  # without a ratio
        ("/admin/aliases/bot/guardrails", {"max_error_rate": 0.1, "control": "x@1"}, 400),
    ],
)
def test_bad_guardrails_are_refused(world_ok: World, path: str, body: Any, status: int) -> None:
    r = world_ok.c.put(path, json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert world_ok.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).status_code == 404


@pytest.fixture
def world_ok(tmp_path: Path, database: str | Path) -> Iterator[World]:
    with open_world(tmp_path, database) as w:
        yield w
