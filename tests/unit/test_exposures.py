"""The exposure log and feedback, through the real app (fake engine), on both databases:
one exposure row per request served through an alias, written off the hot path (never
delaying or failing a request), bounded; feedback only on one's own responses."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.database import open_database
from adapters_registry.experiments import ExperimentStore, Exposure
from adapters_registry.store import Store
from server.experiments.log import ExposureLog
from server.metrics import Metrics, RequestInfo
from server.settings import ExperimentsSettings
from tests.databases import database_contents
from tests.experiments import ADMIN, World, open_world


@pytest.fixture
def world(tmp_path: Path, database: str | Path) -> Iterator[World]:
    with open_world(tmp_path, database) as w:
        yield w


# -- the exposure log ----------------------------------------------------------------------


def test_each_request_through_an_alias_records_one_exposure(world: World) -> None:
    r = world.chat("a", user="alice@example.com")
    assert r.status_code == 200, r.text
    body = r.json()
    world.chat("a", user=None, model="pirate")  # not through an alias: no exposure
    stream = world.chat("b", user="bob", stream=True, stream_options={"include_usage": True})
    assert stream.status_code == 200
    (mine, theirs) = world.exposures()
    assert mine.response_id == body["id"] and body["id"] == f"chatcmpl-{mine.request_id}"
    assert mine.request_id == r.headers["x-request-id"]
    assert mine.variant == r.headers["x-alias-variant"]
    adapter, _, version = mine.variant.partition("@")
    assert (mine.alias, mine.adapter, mine.version) == ("bot", adapter, int(version))
    record = world.app.state.router.registry.adapter(adapter).version(int(version))
    assert mine.content_digest == record.content_digest
    assert mine.tenant == "a" and theirs.tenant == "b"
    assert mine.user_hash == hashlib.sha256(b"alice@example.com").hexdigest()
    assert mine.status == 200
    assert mine.prompt_tokens == body["usage"]["prompt_tokens"]
    assert mine.completion_tokens == body["usage"]["completion_tokens"] == 4
    assert mine.latency_s > 0
    assert mine.ttft_s is None  # time to first token: measured on streams only
    assert theirs.ttft_s is not None and 0 <= theirs.ttft_s <= theirs.latency_s
    assert theirs.completion_tokens == 4 and theirs.response_id.startswith("chatcmpl-")


def test_the_raw_user_is_never_stored(world: World, database: str | Path) -> None:
    assert world.chat("a", user="secret-user-4242").status_code == 200
    world.flush()
    contents = database_contents(database)
    assert b"secret-user-4242" not in contents
    assert hashlib.sha256(b"secret-user-4242").hexdigest().encode() in contents


def test_completions_and_failed_requests_are_exposures_too(world: World) -> None:
    r = world.c.post(
        "/v1/completions",
        json={"model": "bot", "prompt": "hi", "max_tokens": 3, "user": "u"},
        headers=world.auth("a"),
    )
    assert r.status_code == 200
    assert r.json()["id"].startswith("cmpl-")
    # A request refused after the arm was chosen (here: vLLM's own check of the
    # context length) is an exposure with its status.
    bad = world.chat("a", max_tokens=1000)
    assert bad.status_code == 400
    done, refused = world.exposures()
    assert done.response_id == r.json()["id"] and done.status == 200
    assert refused.status == 400 and refused.completion_tokens == 0


def test_an_exposure_is_written_after_its_response_never_before(
    tmp_path: Path, database: str | Path
) -> None:
    """Off the hot path: with a long flush interval nothing is written while serving,
    everything once the writer runs (or at shutdown)."""
    with open_world(tmp_path, database, experiments={"flush_interval_s": 3600}) as w:
        for i in range(3):
            assert w.chat("a", user=f"u{i}").status_code == 200
        store: ExperimentStore = w.app.state.exposures.store
        assert store.count_exposures() == 0 and w.app.state.exposures.pending == 3
    # shut down: what was queued is written
    assert ExperimentStore(open_database(database)).count_exposures() == 3


def test_a_full_queue_drops_and_counts_never_failing_a_request(
    tmp_path: Path, database: str | Path
) -> None:
    extra = {"experiments": {"flush_interval_s": 3600, "queue_max": 2}}
    with open_world(tmp_path, database, **extra) as w:
        for i in range(5):
            assert w.chat("a", user=f"u{i}").status_code == 200
        metrics: Metrics = w.app.state.metrics
        assert metrics.exposures_dropped.labels("queue_full")._value.get() == 3
        assert len(w.exposures()) == 2
        assert metrics.exposures_written._value.get() == 2


def test_a_failing_database_never_fails_a_request(world: World) -> None:
    log: ExposureLog = world.app.state.exposures

    def refuse(rows: Any) -> None:
        raise RuntimeError("database away")

    log.store.add_exposures = refuse  # type: ignore[method-assign]
    for i in range(3):
        assert world.chat("a", user=f"u{i}").status_code == 200
    world.flush()
    metrics: Metrics = world.app.state.metrics
    assert metrics.exposures_dropped.labels("write_failed")._value.get() == 3
    assert log.pending == 0


def test_the_request_does_not_wait_for_the_database(tmp_path: Path, database: str | Path) -> None:
    """A writer stuck in the database does not hold up requests (it runs on a thread,
    from the queue): 5 requests answer while one batch write takes 2 s."""
    with open_world(tmp_path, database, experiments={"flush_interval_s": 3600}) as world:
        _requests_while_a_write_hangs(world)


def _requests_while_a_write_hangs(world: World) -> None:
    log: ExposureLog = world.app.state.exposures
    real = log.store.add_exposures
    slow_started = []

    def slow(rows: Any) -> None:
        slow_started.append(time.monotonic())
        time.sleep(2)
        real(rows)

    log.store.add_exposures = slow  # type: ignore[method-assign]
    assert world.chat("a").status_code == 200
    future = world.c.portal.start_task_soon(log.flush)  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while not slow_started:
        assert time.monotonic() < deadline, "the flush never reached the database"
        time.sleep(0.01)
    start = time.monotonic()
    for i in range(5):
        assert world.chat("a", user=f"v{i}").status_code == 200
    assert time.monotonic() - start < 1.5
    future.result()


def _exposure(i: int, created_at: float, **fields: Any) -> Exposure:
    row: dict[str, Any] = {
        "exposure_id": f"e{i}",
        "response_id": f"chatcmpl-{i}",
        "request_id": f"{i}",
        "alias": "bot",
        "variant": "pirate@1",
        "adapter": "pirate",
        "version": 1,
        "content_digest": "d" * 64,
        "tenant": None,
        "user_hash": None,
        "created_at": created_at,
        "status": 200,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "ttft_s": 0.01,
        "latency_s": 0.02,
        **fields,
    }
    return Exposure(**row)


def test_retention_by_age_and_by_rows_takes_the_feedback_along(database: str | Path) -> None:
    Store(database).close()  # migrates
    store = ExperimentStore(open_database(database))
    now = 1_000_000.0
    store.add_exposures([_exposure(i, now - 1000 + i) for i in range(1000)])
    store.put_feedback("e0", "default", label=1, score=None)
    store.put_feedback("e999", "default", label=0, score=None)
    settings = ExperimentsSettings(retention_days=500 / 86400, max_rows=300)
    log = ExposureLog(store, settings, Metrics(), clock=lambda: now)
    # age: the 500 older than now - 500 s go; rows: then all but the newest 300
    assert asyncio.run(log.prune()) == 700
    left = sorted(e.exposure_id for e in store.exposures("bot"))
    assert left == sorted(f"e{i}" for i in range(700, 1000))
    assert [f.exposure_id for _, f in store.feedback("bot")] == ["e999"]
    assert asyncio.run(log.prune()) == 0


def test_exposure_of_describes_only_alias_requests() -> None:
    from server.experiments.log import exposure_of

    info = RequestInfo(request_id="r", method="POST", path="/v1/chat/completions", started=0.0)
    assert exposure_of(info) is None
    info.alias, info.response_id, info.version = "bot", "chatcmpl-r", "1"
    info.ended = 0.5
    exposure = exposure_of(info, now=7.0)
    assert exposure is not None
    assert (exposure.status, exposure.latency_s, exposure.created_at) == (499, 0.5, 7.0)


# -- feedback -------------------------------------------------------------------------------


def test_feedback_on_ones_own_response(world: World) -> None:
    r = world.chat("a")
    rid = r.json()["id"]
    f = world.feedback("a", response_id=rid, label="positive")
    assert f.status_code == 200, f.text
    got = f.json()
    assert got["object"] == "feedback"
    assert (got["response_id"], got["alias"], got["variant"]) == (
        rid,
        "bot",
        r.headers["x-alias-variant"],
    )
    assert (got["metric"], got["label"], got["score"]) == ("default", 1, None)
    # by request id, another metric, a score
    g = world.feedback("a", request_id=r.headers["x-request-id"], metric="csat", score=4.5)
    assert g.status_code == 200 and g.json()["score"] == 4.5
    store: ExperimentStore = world.app.state.exposures.store
    assert sorted((f.metric, f.label, f.score) for _, f in store.feedback("bot")) == [
        ("csat", None, 4.5),
        ("default", 1, None),
    ]


def test_feedback_is_idempotent_per_response_and_metric_last_wins(world: World) -> None:
    rid = world.chat("a").json()["id"]
    first = world.feedback("a", response_id=rid, label=1).json()
    assert world.feedback("a", response_id=rid, label=1).json()["label"] == 1
    last = world.feedback("a", response_id=rid, label="negative").json()
    assert last["label"] == 0 and last["created_at"] == first["created_at"]
    store: ExperimentStore = world.app.state.exposures.store
    assert [(f.metric, f.label) for _, f in store.feedback("bot")] == [("default", 0)]


def test_feedback_on_a_foreign_or_unknown_response_is_the_same_404(world: World) -> None:
    rid = world.chat("a").json()["id"]
    foreign = world.feedback("b", response_id=rid, label=1)
    unknown = world.feedback("b", response_id="chatcmpl-nope", label=1)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["code"] == "response_not_found"
    assert foreign.json()["error"]["message"].replace(rid, "X") == unknown.json()["error"][
        "message"
    ].replace("chatcmpl-nope", "X")
    assert world.c.get(f"/v1/exposures/{rid}", headers=world.auth("b")).status_code == 404
    # the tenant itself, and the operator, may
    assert world.c.get(f"/v1/exposures/{rid}", headers=world.auth("a")).json()["alias"] == "bot"
    assert world.feedback("admin", response_id=rid, label=0).status_code == 200
    # a plain adapter's response is no exposure
    plain = world.chat("a", model="pirate").json()["id"]
    assert world.feedback("a", response_id=plain, label=1).status_code == 404


def test_feedback_right_after_the_response_finds_it(tmp_path: Path, database: str | Path) -> None:
    """The exposure may still wait in the queue: the lookup flushes it first."""
    with open_world(tmp_path, database, experiments={"flush_interval_s": 3600}) as w:
        rid = w.chat("a").json()["id"]
        assert w.app.state.exposures.pending == 1
        assert w.feedback("a", response_id=rid, label=1).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"label": 1},  # no id
        {"response_id": "x", "request_id": "y", "label": 1},  # both ids
        {"response_id": "x"},  # no outcome
        {"response_id": "x", "label": "great"},
        {"response_id": "x", "label": 2},
        {"response_id": "x", "score": "NaN"},
        {"response_id": "x", "label": 1, "metric": "Bad Metric"},
        {"response_id": "x", "label": 1, "extra": True},
    ],
)
def test_bad_feedback_is_a_400(world: World, body: dict[str, Any]) -> None:
    r = world.feedback("a", **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


# -- the report through the API ---------------------------------------------------------------


def test_report_of_served_requests_and_feedback(world: World) -> None:
    served: dict[str, list[str]] = {}
    for i in range(40):
        r = world.chat("a", user=f"user-{i}")
        served.setdefault(r.headers["x-alias-variant"], []).append(r.json()["id"])
    assert set(served) == {"pirate@1", "formal@1"}  # 40 users over two 50/50 arms
    for rid in served["pirate@1"]:
        world.feedback("a", response_id=rid, label=1, metric="thumbs")
    for rid in served["formal@1"]:
        world.feedback("a", response_id=rid, label=0, metric="thumbs")
    r = world.c.get("/admin/aliases/bot/experiment", headers=ADMIN)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["control"] == "pirate@1" and report["exposures"] == 40
    arms = {a["variant"]: a for a in report["variants"]}
    assert arms["pirate@1"]["exposures"] == len(served["pirate@1"])
    assert arms["formal@1"]["users"] == len(served["formal@1"])
    assert arms["formal@1"]["error_rate"] == 0
    assert arms["pirate@1"]["latency_s"]["p95"] >= arms["pirate@1"]["latency_s"]["p50"] > 0
    assert arms["pirate@1"]["completion_tokens"] == 4 * len(served["pirate@1"])
    thumbs = arms["formal@1"]["metrics"]["thumbs"]["label"]
    assert thumbs["mean"] == 0 and thumbs["vs_control"]["difference"] == -1
    assert thumbs["vs_control"]["p_value"] < 1e-6
    assert report["srm"]["flagged"] is False
    # the other control, a window that holds nothing
    other = world.c.get("/admin/aliases/bot/experiment?control=formal@1", headers=ADMIN).json()
    assert other["control"] == "formal@1"
    future = world.c.get(
        "/admin/aliases/bot/experiment", params={"since": "2999-01-01T00:00:00Z"}, headers=ADMIN
    ).json()
    assert future["exposures"] == 0 and future["srm"] is None


def test_report_errors(world: World) -> None:
    bad = world.c.get("/admin/aliases/bot/experiment?control=nobody", headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "control"
    bad = world.c.get("/admin/aliases/bot/experiment?since=yesterday", headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    assert world.c.get("/admin/aliases/nobody/experiment", headers=ADMIN).status_code == 404
    # admin only
    assert world.c.get("/admin/aliases/bot/experiment", headers=world.auth("a")).status_code == 403


def test_srm_flags_60_40_of_a_50_50_alias_over_10000_rows_not_a_fair_split(
    world: World,
) -> None:
    store: ExperimentStore = world.app.state.exposures.store
    now = time.time()
    rows = [
        _exposure(i, now - 100, variant="pirate@1" if i < 6000 else "formal@1")
        for i in range(10_000)
    ]
    store.add_exposures(rows)
    flagged = world.c.get("/admin/aliases/bot/experiment", headers=ADMIN).json()["srm"]
    assert flagged["observed"] == {"pirate@1": 6000, "formal@1": 4000}
    assert flagged["flagged"] is True and flagged["p_value"] < 1e-80
    # a fair split, 5,040 / 4,960 (p ~ 0.42), in a window without the 60/40 rows
    fair = [
        _exposure(
            20_000 + i,
            now + 10,
            exposure_id=f"f{i}",
            variant="pirate@1" if i < 5040 else "formal@1",
        )
        for i in range(10_000)
    ]
    store.add_exposures(fair)
    report = world.c.get(
        "/admin/aliases/bot/experiment", params={"since": now}, headers=ADMIN
    ).json()
    assert report["srm"]["observed"] == {"pirate@1": 5040, "formal@1": 4960}
    assert report["srm"]["flagged"] is False


def _samples(world: World) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = world.c.get("/metrics", headers=ADMIN).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_exposures_and_first_outcomes_are_metrics_per_alias_and_arm(world: World) -> None:
    ids = {}
    for i in range(12):
        r = world.chat("a", user=f"user-{i}")
        assert r.status_code == 200, r.text
        ids[r.json()["id"]] = r.headers["x-alias-variant"]
    world.chat("a", user=None, model="pirate")  # not through an alias: not an exposure
    scores: dict[str, list[float]] = {"pirate@1": [], "formal@1": []}
    for n, (response_id, variant) in enumerate(ids.items()):
        body = {"response_id": response_id, "metric": "thumbs", "label": n % 2, "score": n}
        assert world.feedback("a", **body).status_code == 200
        scores[variant].append(n)
        # A changed outcome replaces the first in the report; the metrics count firsts only.
        assert world.feedback("a", **{**body, "label": 1, "score": 100}).status_code == 200
    samples = _samples(world)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    for variant in ("pirate@1", "formal@1"):
        arm = {"alias": "bot", "variant": variant}
        served = list(ids.values()).count(variant)
        assert served > 0  # 12 users on a 50/50 split: 2**-11 to fail by chance
        assert value("loraswap_exposures_total", **arm, status="200") == served
        assert value("loraswap_exposure_latency_seconds_count", **arm) == served
        mine = scores[variant]
        thumbs = {**arm, "metric": "thumbs"}
        assert value("loraswap_feedback_score_count", **thumbs) == len(mine)
        assert value("loraswap_feedback_score_sum", **thumbs) == sum(mine)
        assert value("loraswap_feedback_label_count", **thumbs) == len(mine)
        assert value("loraswap_feedback_label_sum", **thumbs) == sum(n % 2 for n in mine)
    assert sum(v for (name, _), v in samples.items() if name == "loraswap_exposures_total") == 12
