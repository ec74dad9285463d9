"""Shadow traffic: a sampled request also runs on the alias's shadow adapter, after its
response, outside the client's account; the client sees only its own reply; both outputs
are recorded; under load shadows are dropped first. Real app, fake engine, both
databases."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters_registry.experiments import ShadowRun
from server.engine.base import LoraHandle
from server.errors import EngineFailure
from server.experiments.shadow import SHADOW_PRIORITY, Shadows
from server.metrics import Metrics
from tests.adapters import make_adapter
from tests.experiments import ADMIN, HI, World, open_world
from tests.fakes import FakeEngine, reply
from tests.testclient import ClientResponse


class GatedEngine(FakeEngine):
    """Holds engine requests at their start: shadows while `shadows_held`, client
    requests whose x-request-id starts with "hold" while `held` (the tests' load)."""

    HOLD = "chatcmpl-hold"  # vLLM's engine request id: its prefix and our x-request-id

    def __init__(self, broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.broken = broken
        self.shadows_held = False
        self.held = False
        self.release = asyncio.Event()
        self.release_shadows = asyncio.Event()

    async def on_generate(self, request_id: str) -> None:
        if request_id.endswith(".shadow"):
            if self.shadows_held:
                await self.release_shadows.wait()
        elif request_id.startswith(self.HOLD) and self.held:
            await self.release.wait()

    async def add_lora(self, lora: LoraHandle) -> None:
        if lora.name in self.broken:
            raise EngineFailure(f"the engine could not load adapter {lora.name!r}")
        await super().add_lora(lora)


@pytest.fixture
def engine() -> GatedEngine:
    return GatedEngine()


@pytest.fixture
def world(tmp_path: Path, database: str | Path, engine: GatedEngine) -> Iterator[World]:
    with open_world(tmp_path, database, engine=engine) as w:
        yield w


def shadow(world: World, status: int = 200, alias: str = "bot", **body: Any) -> dict[str, Any]:
    r = world.c.put(f"/admin/aliases/{alias}/shadow", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    got: dict[str, Any] = r.json()
    return got


def shadows(world: World) -> Shadows:
    found: Shadows = world.app.state.shadows
    return found


def settle(world: World) -> None:
    world.c.portal.call(shadows(world).settle)  # type: ignore[union-attr]


def runs(world: World, alias: str = "bot") -> dict[str, ShadowRun]:
    """Shadow runs by the response id of their request."""
    exposures = {e.exposure_id: e.response_id for e in world.exposures(alias)}
    store = world.app.state.exposures.store
    return {exposures[r.exposure_id]: r for r in store.shadow_runs(alias)}


def counted(world: World, outcome: str, alias: str = "bot") -> float:
    metrics: Metrics = world.app.state.metrics
    value: float = metrics.shadow_requests.labels(alias, outcome)._value.get()
    return value


def greedy_chat(world: World, user: str, **extra: Any) -> ClientResponse:
    r = world.chat("a", user=user, temperature=0, **extra)
    assert r.status_code == 200, r.text
    return r


# -- configuration ------------------------------------------------------------------------


def test_set_get_and_delete_a_shadow(world: World) -> None:
    assert world.c.get("/admin/aliases/bot/shadow", headers=ADMIN).status_code == 404
    assert shadow(world, adapter="formal@1", fraction=0.25) == {
        "alias": "bot",
        "adapter": "formal@1",
        "fraction": 0.25,
    }
    got = world.c.get("/admin/aliases/bot/shadow", headers=ADMIN).json()
    assert got == {"alias": "bot", "adapter": "formal@1", "fraction": 0.25}
    # replaced, following the current version this time
    assert shadow(world, adapter="formal", fraction=1)["adapter"] == "formal"
    assert world.c.delete("/admin/aliases/bot/shadow", headers=ADMIN).json()["adapter"] == "formal"
    assert world.c.get("/admin/aliases/bot/shadow", headers=ADMIN).status_code == 404
    assert world.c.delete("/admin/aliases/bot/shadow", headers=ADMIN).status_code == 404
    # stored: a new Shadows over the same database reads it back
    shadow(world, adapter="pirate@1", fraction=0.5)
    store = world.app.state.exposures.store
    assert store.shadows()["bot"].key == "pirate@1"


@pytest.mark.parametrize(
    "body",
    [
        {"adapter": "formal@1", "fraction": 1.5},
        {"adapter": "formal@1", "fraction": -0.1},
        {"adapter": "formal@1"},
        {"adapter": "Formal", "fraction": 1},
        {"adapter": "formal@0", "fraction": 1},
        {"adapter": "formal@x", "fraction": 1},
        {"adapter": "", "fraction": 1},
        {"adapter": "nobody", "fraction": 1},  # no such adapter
        {"adapter": "formal@9", "fraction": 1},  # no such version
        {"adapter": "formal", "fraction": 1, "priority": 0},
    ],
)
def test_bad_shadows_are_400(world: World, body: dict[str, Any]) -> None:
    r = world.c.put("/admin/aliases/bot/shadow", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert world.c.get("/admin/aliases/bot/shadow", headers=ADMIN).status_code == 404


def test_a_shadow_needs_an_alias_and_the_admin_key(world: World) -> None:
    r = world.c.put("/admin/aliases/nope/shadow", json={"adapter": "formal", "fraction": 1})
    assert r.status_code in (401, 403)
    r = world.c.put(
        "/admin/aliases/bot/shadow",
        json={"adapter": "formal", "fraction": 1},
        headers=world.auth("a"),
    )
    assert r.status_code in (401, 403)
    shadow(world, 404, alias="nope", adapter="formal", fraction=1)


def test_a_shadow_must_be_usable_by_the_alias_s_callers(world: World, tmp_path: Path) -> None:
    """The rule of an alias's variants: no way into an adapter its users could not name."""
    for name, owner in (("secret-b", "b"), ("mine-a", "a")):
        r = world.c.post(
            "/admin/adapters",
            headers=ADMIN,
            json={
                "name": name,
                "source": str(make_adapter(tmp_path / "allowed" / name, seed=9)),
                "owner": owner,
            },
        )
        assert r.status_code == 201, r.text
    r = world.c.put(
        "/admin/aliases/abot",
        headers=ADMIN,
        json={"variants": {"pirate@1": 1}, "owner": "a"},
    )
    assert r.status_code == 200, r.text
    # tenant b's private adapter behind tenant a's alias; a's behind a shared alias
    shadow(world, 400, alias="abot", adapter="secret-b", fraction=1)
    shadow(world, 400, alias="bot", adapter="mine-a", fraction=1)
    # a's own adapter behind a's alias; a shared one behind anything
    shadow(world, alias="abot", adapter="mine-a", fraction=1)
    shadow(world, alias="bot", adapter="formal", fraction=1)


# -- running ---------------------------------------------------------------------------------


def test_at_100_percent_clients_get_the_control_s_replies_and_both_are_recorded(
    world: World, engine: GatedEngine
) -> None:
    shadow(world, adapter="formal@1", fraction=1)
    replies = {}
    for i in range(8):
        r = greedy_chat(world, f"u{i}")
        variant = r.headers["x-alias-variant"]
        # exactly the control's reply, and nothing about the shadow in the answer
        assert r.json()["choices"][0]["message"]["content"] == reply(variant, 4)
        assert r.json()["usage"]["completion_tokens"] == 4
        assert not [h for h in r.headers if "shadow" in h.lower()]
        assert "shadow" not in r.text
        replies[r.json()["id"]] = variant
        settle(world)  # one at a time (at most one runs: shadow_max_running)
    assert set(replies.values()) == {"pirate@1", "formal@1"}
    recorded = runs(world)
    assert set(recorded) == set(replies)
    for response_id, variant in replies.items():
        run = recorded[response_id]
        assert (run.outcome, run.shadow, run.adapter, run.version) == (
            "run",
            "formal@1",
            "formal",
            1,
        )
        assert run.greedy and run.control_tokens == 4 and run.shadow_tokens == 4
        assert run.control_latency_s is not None and run.shadow_latency_s is not None
        # formal@1's shadow gives its own tokens: the same as formal@1's arm, not pirate@1's
        assert run.greedy_match == (variant == "formal@1")
    assert counted(world, "run") == 8
    # the shadow ran at the lowest priority, with the request's own engine input
    shadow_ids = [i for i, (rid, _) in enumerate(engine.requests) if rid.endswith(".shadow")]
    assert len(shadow_ids) == 8
    assert all(engine.priorities[i] == SHADOW_PRIORITY for i in shadow_ids)
    assert all(p == 0 for i, p in enumerate(engine.priorities) if i not in shadow_ids)


def test_streamed_and_sampled_requests_are_shadowed_too(world: World) -> None:
    shadow(world, adapter="pirate@1", fraction=1)
    r = world.chat("a", user="u1", stream=True, temperature=0)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    r2 = world.chat("a", user="u2", temperature=1.0)  # not greedy: no comparison
    settle(world)
    recorded = runs(world)
    streamed = next(run for rid, run in recorded.items() if rid != r2.json()["id"])
    assert streamed.outcome == "run" and streamed.greedy and streamed.control_tokens == 4
    assert streamed.greedy_match is not None
    sampled = recorded[r2.json()["id"]]
    assert (sampled.outcome, sampled.greedy, sampled.greedy_match) == ("run", False, None)


def test_requests_are_sampled_per_request_at_the_fraction(world: World) -> None:
    shadow(world, adapter="formal@1", fraction=0.5)
    shadows(world).rng = random.Random(7)
    expected = random.Random(7)
    sampled = [expected.random() < 0.5 for _ in range(20)]
    ids = []
    for _ in range(20):
        ids.append(greedy_chat(world, "same-user").json()["id"])  # not sticky per user
        settle(world)
    recorded = runs(world)
    assert [i in recorded for i in ids] == sampled
    assert 0 < sum(sampled) < 20
    shadow(world, adapter="formal@1", fraction=0)
    greedy_chat(world, "u1")
    settle(world)
    assert len(runs(world)) == sum(sampled)


def test_a_failing_shadow_never_touches_the_client_s_request(
    tmp_path: Path, database: str | Path
) -> None:
    engine = GatedEngine(broken={"shout@1"})
    with open_world(tmp_path, database, engine=engine) as world:
        r = world.c.post(
            "/admin/adapters",
            headers=ADMIN,
            json={
                "name": "shout",
                "source": str(make_adapter(tmp_path / "allowed" / "shout", seed=5)),
                "shared": True,
            },
        )
        assert r.status_code == 201, r.text
        shadow(world, adapter="shout", fraction=1)
        for i in range(3):
            r = greedy_chat(world, f"u{i}")
            assert r.json()["choices"][0]["message"]["content"] == reply(
                r.headers["x-alias-variant"], 4
            )
            settle(world)
        recorded = runs(world)
        assert [run.outcome for run in recorded.values()] == ["failed"] * 3
        assert all(
            run.shadow_tokens is None and run.greedy_match is None for run in recorded.values()
        )
        assert counted(world, "failed") == 3 and counted(world, "run") == 0


def test_a_shadow_counts_against_no_quota(tmp_path: Path, database: str | Path) -> None:
    """A tenant allowed one request at a time, on a server allowed one in flight, sends
    its next request while its last one's shadow still runs: served, not 429 or 503."""
    engine = GatedEngine()
    with open_world(tmp_path, database, engine=engine, max_in_flight=1) as world:
        r = world.c.put("/admin/tenants/a", headers=ADMIN, json={"max_concurrent": 1})
        assert r.status_code == 200, r.text
        shadow(world, adapter="formal@1", fraction=1)
        engine.shadows_held = True
        greedy_chat(world, "u1")
        assert shadows(world).running == 1
        greedy_chat(world, "u2")  # the shadow still holds its place in the engine
        assert shadows(world).running == 1
        world.c.portal.call(engine.release_shadows.set)  # type: ignore[union-attr]
        settle(world)
        outcomes = sorted(run.outcome for run in runs(world).values())
        # the second request's shadow found the first one running (one at a time)
        assert outcomes == ["dropped", "run"]


# -- under load -------------------------------------------------------------------------------


async def _post(world: World, request_id: str, user: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=world.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
        return await c.post(
            "/v1/chat/completions",
            json={"model": "bot", "messages": HI, "max_tokens": 4, "user": user, "temperature": 0},
            headers={**world.auth("a"), "x-request-id": request_id},
        )


def test_under_load_shadows_are_dropped_first(world: World, engine: GatedEngine) -> None:
    """Past `shadow_max_busy` (1) client requests in flight: a finished request's shadow
    is not started, and a running shadow is aborted; every client request is served."""
    shadow(world, adapter="formal@1", fraction=1)

    async def scenario() -> dict[str, httpx.Response]:
        try:
            return await load()
        finally:  # whatever failed, nothing stays held in the engine
            engine.release.set()
            engine.release_shadows.set()

    async def load() -> dict[str, httpx.Response]:
        out = {}
        # 1. a shadow running (held in the engine) when the load arrives: aborted
        engine.shadows_held = True
        out["first"] = await _post(world, "first", "u1")
        while shadows(world).running == 0:
            await asyncio.sleep(0.01)
        engine.held = True
        held = [asyncio.create_task(_post(world, f"hold-{i}", f"h{i}")) for i in range(2)]
        while len([r for r, _ in engine.requests if r.startswith(engine.HOLD)]) < 2:
            await asyncio.sleep(0.01)
        # the held shadow is gone without being let go (or the test fails here)
        await asyncio.wait_for(shadows(world).settle(), 10)
        # 2. a request finishing while two others are in flight: its shadow not started
        engine.shadows_held = False
        out["busy"] = await _post(world, "busy", "u2")
        await asyncio.sleep(0.05)
        assert shadows(world).running == 0
        # 3. the load goes: the held requests are served, and shadows run again
        engine.release.set()
        for i, task in enumerate(held):
            out[f"hold-{i}"] = await task
        await shadows(world).settle()
        out["after"] = await _post(world, "after", "u3")
        await shadows(world).settle()
        return out

    served = world.c.portal.call(scenario)  # type: ignore[union-attr]
    assert {k: r.status_code for k, r in served.items()} == dict.fromkeys(served, 200)
    for r in served.values():
        assert r.json()["choices"][0]["message"]["content"] == reply(
            r.headers["x-alias-variant"], 4
        )
    recorded = runs(world)
    outcome = {k: recorded[r.json()["id"]].outcome for k, r in served.items()}
    assert outcome["first"] == "dropped"  # aborted by the load
    assert outcome["busy"] == "dropped"  # never started
    assert outcome["after"] == "run"
    assert counted(world, "dropped") >= 2 and counted(world, "run") >= 1
    # the aborted shadow never produced a token
    assert not any(r.endswith(".shadow") for r in engine.running)


def test_the_report_sums_up_the_shadow(world: World) -> None:
    shadow(world, adapter="formal@1", fraction=1)
    for i in range(6):
        greedy_chat(world, f"u{i}")
        settle(world)
    report = world.c.get("/admin/aliases/bot/experiment", headers=ADMIN).json()
    (summary,) = report["shadow"]
    arms = {v["variant"]: v["exposures"] for v in report["variants"]}
    assert summary["shadow"] == "formal@1" and summary["versions"] == ["formal@1"]
    assert (summary["sampled"], summary["runs"], summary["dropped"], summary["failed"]) == (
        6,
        6,
        0,
        0,
    )
    assert summary["greedy_compared"] == 6
    assert summary["greedy_matches"] == arms.get("formal@1", 0)
    assert summary["match_rate"] == pytest.approx(arms.get("formal@1", 0) / 6)
    assert summary["control"]["completion_tokens_mean"] == 4
    assert summary["candidate"]["completion_tokens_mean"] == 4
    assert summary["candidate"]["latency_s_mean"] > 0
    # no shadow, no section
    world.c.delete("/admin/aliases/bot/shadow", headers=ADMIN)
    world.c.put("/admin/aliases/b2", headers=ADMIN, json={"variants": {"pirate": 1}})
    world.chat("a", model="b2")
    assert world.c.get("/admin/aliases/b2/experiment", headers=ADMIN).json()["shadow"] == []


def test_a_version_pinned_by_a_shadow_stays_loaded_between_runs(
    world: World, engine: GatedEngine, tmp_path: Path
) -> None:
    """formal@1 is no longer current (formal@2 is): only the shadow reaches it."""
    r = world.c.post(
        "/admin/adapters/formal/versions",
        headers=ADMIN,
        json={"source": str(make_adapter(tmp_path / "allowed" / "formal2", seed=11))},
    )
    assert r.status_code == 201, r.text
    world.c.put(
        "/admin/aliases/bot", headers=ADMIN, json={"variants": {"pirate@1": 1}, "shared": True}
    )
    shadow(world, adapter="formal@1", fraction=1)
    for i in range(3):
        greedy_chat(world, f"u{i}")
        settle(world)
    assert [h.name for h in engine.loaded].count("formal@1") == 1
