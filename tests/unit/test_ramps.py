"""Ramps: a candidate's share stepped up on a schedule, only while the guardrails hold.
Real app, fake engine, both databases."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.experiments import RampStore
from server.engine.base import LoraHandle
from server.errors import EngineFailure
from server.experiments.ramps import Ramps
from tests.experiments import ADMIN, World, open_world
from tests.fakes import FakeEngine


class FailingEngine(FakeEngine):
    def __init__(self, broken: set[str]) -> None:
        super().__init__()
        self.broken = broken

    async def add_lora(self, lora: LoraHandle) -> None:
        if lora.name in self.broken:
            raise EngineFailure(f"the engine could not load adapter {lora.name!r}")
        await super().add_lora(lora)


@pytest.fixture
def world(tmp_path: Path, database: str | Path) -> Iterator[World]:
    with open_world(tmp_path, database) as w:
        yield w


def ramp(world: World, status: int = 200, **body: Any) -> dict[str, Any]:
    r = world.c.put("/admin/aliases/bot/ramp", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    got: dict[str, Any] = r.json()
    return got


def weights(world: World) -> dict[str, int]:
    got: dict[str, int] = world.c.get("/admin/aliases/bot", headers=ADMIN).json()["variants"]
    return got


def settle(world: World) -> None:
    ramps: Ramps = world.app.state.ramps
    world.c.portal.call(ramps.settle)  # type: ignore[union-attr]


def audit(world: World) -> list[str]:
    events = world.c.get("/admin/aliases/bot/guardrails", headers=ADMIN).json()["events"]
    return [e["rule"] for e in events]


def test_a_ramp_steps_up_every_n_exposures_until_done(world: World) -> None:
    started = ramp(world, candidate="formal@1", steps=[10, 50, 100], every_exposures=5)
    assert (started["step"], started["percent"], started["state"]) == (0, 10, "running")
    assert weights(world) == {"pirate@1": 9000, "formal@1": 1000}
    for i in range(5):
        assert world.chat("a", user=f"u{i}").status_code == 200
    settle(world)
    assert weights(world) == {"pirate@1": 5000, "formal@1": 5000}
    assert world.c.get("/admin/aliases/bot/ramp", headers=ADMIN).json()["step"] == 1
    for i in range(5):
        world.chat("a", user=f"v{i}")
    settle(world)
    assert weights(world) == {"pirate@1": 0, "formal@1": 10_000}
    done = world.c.get("/admin/aliases/bot/ramp", headers=ADMIN).json()
    assert (done["step"], done["percent"], done["state"]) == (2, 100, "done")
    served = {world.chat("a", user=f"w{i}").headers["x-alias-variant"] for i in range(10)}
    settle(world)
    assert served == {"formal@1"} and weights(world)["formal@1"] == 10_000
    assert audit(world) == ["ramp_step"] * 3


def test_a_guardrail_taking_the_candidate_out_halts_the_ramp(
    tmp_path: Path, database: str | Path
) -> None:
    engine = FailingEngine({"formal@1"})
    with open_world(tmp_path, database, engine=engine) as world:
        r = world.c.put(
            "/admin/aliases/bot/guardrails",
            json={"min_exposures": 3, "max_error_rate": 0.5},
            headers=ADMIN,
        )
        assert r.status_code == 200
        # 20 exposures per step: the failing arm has had its 3 (of ~10) well before
        ramp(world, candidate="formal@1", steps=[50, 100], every_exposures=20)
        failures = 0
        for i in range(40):
            failures += world.chat("a", user=f"u{i}").status_code != 200
            settle(world)
        assert failures == 3  # the guardrail's minimum, then the arm is out
        halted = world.c.get("/admin/aliases/bot/ramp", headers=ADMIN).json()
        assert (halted["state"], halted["step"]) == ("halted", 0)
        assert weights(world) == {"pirate@1": 5000, "formal@1": 0}
        assert audit(world) == ["ramp_step", "error_rate", "ramp_halted"]


def test_a_ramp_steps_by_time(world: World) -> None:
    ramp(world, candidate="formal@1", steps=[20, 100], every_s=60)
    ramps: Ramps = world.app.state.ramps
    world.c.portal.call(ramps.tick)  # type: ignore[union-attr]
    assert weights(world) == {"pirate@1": 8000, "formal@1": 2000}  # not due yet
    ramps._clock = lambda: time.time() + 61  # a minute later
    world.c.portal.call(ramps.tick)  # type: ignore[union-attr]
    assert weights(world) == {"pirate@1": 0, "formal@1": 10_000}
    assert world.c.get("/admin/aliases/bot/ramp", headers=ADMIN).json()["state"] == "done"


def test_replicas_take_each_step_once(world: World) -> None:
    ramp(world, candidate="formal@1", steps=[10, 50, 100], every_exposures=1000)
    mine: Ramps = world.app.state.ramps
    registry = world.app.state.router.registry
    other = Ramps(registry, RampStore(registry.database), world.app.state.exposures.store)
    other.load()
    portal = world.c.portal
    portal.call(mine._take_step, "bot")  # type: ignore[union-attr]
    assert weights(world) == {"pirate@1": 5000, "formal@1": 5000}
    # the other replica still has step 0: its claim of step 1 fails
    portal.call(other._take_step, "bot")  # type: ignore[union-attr]
    assert weights(world) == {"pirate@1": 5000, "formal@1": 5000}  # not stepped twice
    record = other.get("bot")
    assert record is not None and record.step == 1  # it follows the database


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"candidate": "nobody@1", "steps": [10], "every_s": 1}, 400),
        ({"candidate": "formal@1", "steps": [50, 10], "every_s": 1}, 400),
        ({"candidate": "formal@1", "steps": [10, 50]}, 400),  # no schedule
        ({"candidate": "formal@1", "steps": [0, 50], "every_s": 1}, 400),
        ({"candidate": "formal@1", "steps": [10, 101], "every_s": 1}, 400),
        ({"candidate": "formal@1", "steps": [], "every_s": 1}, 400),
    ],
)
def test_bad_ramps_are_refused(world: World, body: dict[str, Any], status: int) -> None:
    ramp(world, status=status, **body)
    assert weights(world) == {"pirate@1": 1, "formal@1": 1}
    assert world.c.get("/admin/aliases/bot/ramp", headers=ADMIN).status_code == 404


def test_stopping_a_ramp_leaves_the_weights(world: World) -> None:
    r = world.c.put(
        "/admin/aliases/nobody/ramp",
        json={"candidate": "x", "steps": [1], "every_s": 1},
        headers=ADMIN,
    )
    assert r.status_code == 404
    ramp(world, candidate="formal@1", steps=[25, 100], every_exposures=1000)
    stopped = world.c.delete("/admin/aliases/bot/ramp", headers=ADMIN)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert world.c.get("/admin/aliases/bot/ramp", headers=ADMIN).status_code == 404
    assert world.c.delete("/admin/aliases/bot/ramp", headers=ADMIN).status_code == 404
    assert weights(world) == {"pirate@1": 7500, "formal@1": 2500}
