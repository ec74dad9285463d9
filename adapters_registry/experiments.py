"""Persistence of A/B experiments: the exposure log, feedback, guardrails, ramps, shadows.

An *exposure* is one inference request served through an alias: which arm served it
(variant key, concrete adapter@version and its content digest), for whom (tenant, a
sha256 of the end user, never the user itself), and how it went (status, tokens, TTFT,
latency). *Feedback* is an outcome a caller reports later about one exposure, per metric
(a binary label and/or a numeric score). Together they are what an experiment report
joins (server/experiments/report.py). A *shadow run* is what became of one sampled
request's second run on an alias's shadow adapter (server/experiments/shadow.py).

The tables come with schema versions 4 and 6 of the registry database (schema.py's migrations),
so they live in the same SQLite file or PostgreSQL database as the registry. Writes here
do not bump the registry's change counter: replicas reload their registry snapshot on
registry changes, not on every batch of exposures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

from adapters_registry.database import Connection, Database

# Rows per INSERT statement: 16 parameters each, far below SQLite's 32,766.
_ROWS_PER_INSERT = 200

# Schema version 4 (applied by schema.py like every migration).
MIGRATION = (
    "CREATE TABLE IF NOT EXISTS exposures ("
    "exposure_id TEXT PRIMARY KEY, response_id TEXT NOT NULL, request_id TEXT NOT NULL, "
    "alias TEXT NOT NULL, variant TEXT NOT NULL, adapter TEXT NOT NULL, "
    "version BIGINT NOT NULL, content_digest TEXT NOT NULL, tenant TEXT, user_hash TEXT, "
    "created_at DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL, "
    "prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, "
    "ttft_s DOUBLE PRECISION, latency_s DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS exposures_by_response ON exposures (response_id)",
    "CREATE INDEX IF NOT EXISTS exposures_by_request ON exposures (request_id)",
    "CREATE INDEX IF NOT EXISTS exposures_by_alias ON exposures (alias, created_at)",
    "CREATE INDEX IF NOT EXISTS exposures_by_time ON exposures (created_at)",
    # One outcome per (exposure, metric); retention of exposures takes their feedback.
    "CREATE TABLE IF NOT EXISTS feedback ("
    "exposure_id TEXT NOT NULL REFERENCES exposures(exposure_id) ON DELETE CASCADE, "
    "metric TEXT NOT NULL, label INTEGER, score DOUBLE PRECISION, "
    "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, "
    "PRIMARY KEY (exposure_id, metric))",
    # Guardrail limits per alias (JSON), and what they did (the audit trail).
    "CREATE TABLE IF NOT EXISTS guardrails ("
    "alias TEXT PRIMARY KEY, config TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS guardrail_events ("
    "event_id TEXT PRIMARY KEY, alias TEXT NOT NULL, variant TEXT NOT NULL, "
    "rule TEXT NOT NULL, detail TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
    # Ramps: a schedule of the candidate arm's share, and where it stands.
    "CREATE TABLE IF NOT EXISTS ramps ("
    "alias TEXT PRIMARY KEY, config TEXT NOT NULL, step BIGINT NOT NULL, "
    "state TEXT NOT NULL, step_started_at DOUBLE PRECISION NOT NULL, "
    "updated_at DOUBLE PRECISION NOT NULL)",
)


# Schema version 6: shadow traffic. A table of its own rather than columns of `exposures`:
# a shadow runs after its request's response is over, so its outcome is known only after
# the exposure row has been queued (often written); and most exposures have no shadow.
SHADOW_MIGRATION = (
    # One shadow per alias: its adapter (version None: follows the current one) and the
    # share of the alias's requests that also run on it.
    "CREATE TABLE IF NOT EXISTS shadows ("
    "alias TEXT PRIMARY KEY, adapter TEXT NOT NULL, version BIGINT, "
    "fraction DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
    # What became of each sampled request's shadow; retention of exposures takes it.
    "CREATE TABLE IF NOT EXISTS shadow_runs ("
    "exposure_id TEXT PRIMARY KEY REFERENCES exposures(exposure_id) ON DELETE CASCADE, "
    "shadow TEXT NOT NULL, adapter TEXT, version BIGINT, outcome TEXT NOT NULL, "
    "greedy INTEGER NOT NULL, control_tokens BIGINT NOT NULL, "
    "control_latency_s DOUBLE PRECISION, shadow_tokens BIGINT, "
    "shadow_latency_s DOUBLE PRECISION, greedy_match INTEGER, "
    "created_at DOUBLE PRECISION NOT NULL)",
)


@dataclass(frozen=True)
class Exposure:
    exposure_id: str  # ours, unique; response and request ids may repeat (client-chosen)
    response_id: str  # the id in the response body: chatcmpl-..., cmpl-..., resp_...
    request_id: str  # x-request-id
    alias: str
    variant: str  # the arm's key: "pirate@3", or "pirate" following the current version
    adapter: str
    version: int
    content_digest: str
    tenant: str | None  # None: the operator, or open mode
    user_hash: str | None  # sha256 hex of the `user` / x-user-id; None without a user
    created_at: float
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float

    @property
    def is_error(self) -> bool:
        """A failure the arm may own (a 5xx): a bad request or a quota refusal is not."""
        return self.status >= 500


# The columns of an exposure row are `Exposure`'s fields, in their order.
_EXPOSURE_FIELDS = tuple(f.name for f in fields(Exposure))
_EXPOSURE_COLUMNS = ", ".join(_EXPOSURE_FIELDS)
_exposure_values = attrgetter(*_EXPOSURE_FIELDS)


@dataclass(frozen=True)
class ShadowConfig:
    alias: str
    adapter: str
    version: int | None  # None: the adapter's current version at each run
    fraction: float  # of the alias's requests, sampled per request

    @property
    def key(self) -> str:
        return self.adapter if self.version is None else f"{self.adapter}@{self.version}"


@dataclass(frozen=True)
class ShadowRun:
    """One sampled request's shadow: `run` (both outputs known), `dropped` (not started,
    or aborted, because the server was busy) or `failed` (the shadow's own error)."""

    exposure_id: str
    shadow: str  # the configured key: "formal" or "formal@2"
    adapter: str | None  # the version it ran on (None: dropped before resolving it)
    version: int | None
    outcome: str
    greedy: bool  # temperature 0: the two outputs are comparable token for token
    control_tokens: int  # completion tokens of the request's own engine run
    control_latency_s: float | None
    shadow_tokens: int | None
    shadow_latency_s: float | None
    greedy_match: bool | None  # greedy and both finished: the same tokens; else None
    created_at: float


# The columns of a shadow run row are `ShadowRun`'s fields, in their order.
_SHADOW_RUN_COLUMNS = ", ".join(f.name for f in fields(ShadowRun))


def _shadow_run(row: Sequence[object]) -> ShadowRun:
    def opt_int(v: object) -> int | None:
        return None if v is None else int(str(v))

    def opt_float(v: object) -> float | None:
        return None if v is None else float(str(v))

    match = opt_int(row[10])
    return ShadowRun(
        exposure_id=str(row[0]),
        shadow=str(row[1]),
        adapter=None if row[2] is None else str(row[2]),
        version=opt_int(row[3]),
        outcome=str(row[4]),
        greedy=bool(int(str(row[5]))),
        control_tokens=int(str(row[6])),
        control_latency_s=opt_float(row[7]),
        shadow_tokens=opt_int(row[8]),
        shadow_latency_s=opt_float(row[9]),
        greedy_match=None if match is None else bool(match),
        created_at=float(str(row[11])),
    )


@dataclass(frozen=True)
class Feedback:
    exposure_id: str
    metric: str
    label: int | None  # 1 positive, 0 negative
    score: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class GuardrailEvent:
    event_id: str
    alias: str
    variant: str
    rule: str
    detail: dict[str, object]
    created_at: float


def _exposure(row: Sequence[object]) -> Exposure:
    return Exposure(
        exposure_id=str(row[0]),
        response_id=str(row[1]),
        request_id=str(row[2]),
        alias=str(row[3]),
        variant=str(row[4]),
        adapter=str(row[5]),
        version=int(str(row[6])),
        content_digest=str(row[7]),
        tenant=None if row[8] is None else str(row[8]),
        user_hash=None if row[9] is None else str(row[9]),
        created_at=float(str(row[10])),
        status=int(str(row[11])),
        prompt_tokens=int(str(row[12])),
        completion_tokens=int(str(row[13])),
        ttft_s=None if row[14] is None else float(str(row[14])),
        latency_s=float(str(row[15])),
    )


def _feedback(row: Sequence[object]) -> Feedback:
    return Feedback(
        exposure_id=str(row[0]),
        metric=str(row[1]),
        label=None if row[2] is None else int(str(row[2])),
        score=None if row[3] is None else float(str(row[3])),
        created_at=float(str(row[4])),
        updated_at=float(str(row[5])),
    )


def _window(since: float | None, until: float | None) -> tuple[str, list[object]]:
    sql = ""
    params: list[object] = []
    if since is not None:
        sql += " AND e.created_at >= ?"
        params.append(since)
    if until is not None:
        sql += " AND e.created_at < ?"
        params.append(until)
    return sql, params


class ExperimentStore:
    """Exposures, feedback, shadows and guardrail records in the registry's database
    (schema 4 and 6: open a `Store` on it first, which migrates it)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- exposures -----------------------------------------------------------------------

    def add_exposures(self, rows: Sequence[Exposure]) -> None:
        """Record a batch in one transaction: all of it or none (durable on return)."""
        if not rows:
            return
        with self._db.write() as db:
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                row = "(" + ",".join("?" * len(_EXPOSURE_FIELDS)) + ")"
                values = ",".join([row] * len(chunk))
                params: list[object] = []
                for e in chunk:
                    params += _exposure_values(e)
                db.execute(f"INSERT INTO exposures ({_EXPOSURE_COLUMNS}) VALUES {values}", params)

    def find_exposure(
        self, *, response_id: str | None = None, request_id: str | None = None
    ) -> list[Exposure]:
        """Exposures with that response id (or request id), newest first. Callers filter
        by tenant: ids are chosen by clients, so two tenants may have used the same."""
        column, value = ("response_id", response_id) if response_id else ("request_id", request_id)
        if not value:
            return []
        with self._db.read() as db:
            rows = db.execute(
                f"SELECT {_EXPOSURE_COLUMNS} FROM exposures WHERE {column}=?", (value,)
            ).fetchall()
        return sorted((_exposure(r) for r in rows), key=lambda e: -e.created_at)

    def exposures(
        self, alias: str, *, since: float | None = None, until: float | None = None
    ) -> list[Exposure]:
        window, params = _window(since, until)
        with self._db.read() as db:
            rows = db.execute(
                f"SELECT {_EXPOSURE_COLUMNS} FROM exposures e WHERE e.alias=?{window}",
                (alias, *params),
            ).fetchall()
        return [_exposure(r) for r in rows]

    def count_exposures(self) -> int:
        with self._db.read() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM exposures").fetchone()
        return int(count)

    def prune(self, *, older_than: float | None, max_rows: int | None) -> int:
        """Retention: drop exposures (and their feedback) created before `older_than`,
        then all but the newest `max_rows`; the number of exposures dropped."""
        dropped = 0
        with self._db.write() as db:
            if older_than is not None:
                dropped += db.execute(
                    "DELETE FROM exposures WHERE created_at < ?", (older_than,)
                ).rowcount
            if max_rows is not None:
                # The created_at of the newest row beyond the cap; NULL (nothing deleted)
                # while there are fewer rows.
                dropped += db.execute(
                    "DELETE FROM exposures WHERE created_at <= (SELECT created_at FROM "
                    "exposures ORDER BY created_at DESC LIMIT 1 OFFSET ?)",
                    (max_rows,),
                ).rowcount
        return max(dropped, 0)

    # -- feedback ------------------------------------------------------------------------

    def put_feedback(
        self, exposure_id: str, metric: str, *, label: int | None, score: float | None
    ) -> Feedback:
        """Record an outcome; a second one for the same (exposure, metric) replaces the
        first (last write wins: a user may change their thumbs), keeping `created_at`."""
        now = time.time()
        with self._db.write() as db:
            db.execute(
                "INSERT INTO feedback (exposure_id, metric, label, score, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT (exposure_id, metric) DO "
                "UPDATE SET label=excluded.label, score=excluded.score, "
                "updated_at=excluded.updated_at",
                (exposure_id, metric, label, score, now, now),
            )
            row = db.execute(
                "SELECT exposure_id, metric, label, score, created_at, updated_at FROM "
                "feedback WHERE exposure_id=? AND metric=?",
                (exposure_id, metric),
            ).fetchone()
        return _feedback(row)

    def feedback(
        self, alias: str, *, since: float | None = None, until: float | None = None
    ) -> list[tuple[str, Feedback]]:
        """(variant, feedback) of the alias's exposures in the window (by exposure time)."""
        window, params = _window(since, until)
        with self._db.read() as db:
            rows = db.execute(
                "SELECT e.variant, f.exposure_id, f.metric, f.label, f.score, f.created_at, "
                "f.updated_at FROM feedback f JOIN exposures e ON e.exposure_id = f.exposure_id "
                f"WHERE e.alias=?{window}",
                (alias, *params),
            ).fetchall()
        return [(str(r[0]), _feedback(r[1:])) for r in rows]

    # -- shadows -------------------------------------------------------------------------

    def put_shadow(self, alias: str, config: ShadowConfig | None) -> None:
        """Set (None: remove) an alias's shadow."""
        with self._db.write() as db:
            if config is None:
                db.execute("DELETE FROM shadows WHERE alias=?", (alias,))
                return
            db.execute(
                "INSERT INTO shadows (alias, adapter, version, fraction, updated_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT (alias) DO UPDATE SET "
                "adapter=excluded.adapter, version=excluded.version, "
                "fraction=excluded.fraction, updated_at=excluded.updated_at",
                (alias, config.adapter, config.version, config.fraction, time.time()),
            )

    def shadows(self) -> dict[str, ShadowConfig]:
        with self._db.read() as db:
            rows = db.execute("SELECT alias, adapter, version, fraction FROM shadows").fetchall()
        return {
            str(r[0]): ShadowConfig(
                alias=str(r[0]),
                adapter=str(r[1]),
                version=None if r[2] is None else int(str(r[2])),
                fraction=float(str(r[3])),
            )
            for r in rows
        }

    def add_shadow_runs(self, rows: Sequence[ShadowRun]) -> int:
        """Record shadow runs in one transaction; those whose exposure is not in the
        database (it was dropped, or the exposure log is off) are skipped. The number
        recorded."""
        if not rows:
            return 0
        written = 0
        with self._db.write() as db:
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                marks = ",".join("?" * len(chunk))
                found = db.execute(
                    f"SELECT exposure_id FROM exposures WHERE exposure_id IN ({marks})",
                    [r.exposure_id for r in chunk],
                ).fetchall()
                present = {str(f[0]) for f in found}
                for r in chunk:
                    if r.exposure_id not in present:
                        continue
                    db.execute(
                        f"INSERT INTO shadow_runs ({_SHADOW_RUN_COLUMNS}) VALUES "
                        "(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (exposure_id) DO NOTHING",
                        (
                            r.exposure_id,
                            r.shadow,
                            r.adapter,
                            r.version,
                            r.outcome,
                            int(r.greedy),
                            r.control_tokens,
                            r.control_latency_s,
                            r.shadow_tokens,
                            r.shadow_latency_s,
                            None if r.greedy_match is None else int(r.greedy_match),
                            r.created_at,
                        ),
                    )
                    written += 1
        return written

    def shadow_runs(
        self, alias: str, *, since: float | None = None, until: float | None = None
    ) -> list[ShadowRun]:
        """The shadow runs of the alias's exposures in the window (by exposure time)."""
        window, params = _window(since, until)
        columns = ", ".join(f"s.{c.strip()}" for c in _SHADOW_RUN_COLUMNS.split(","))
        with self._db.read() as db:
            rows = db.execute(
                f"SELECT {columns} FROM shadow_runs s JOIN exposures e "
                f"ON e.exposure_id = s.exposure_id WHERE e.alias=?{window}",
                (alias, *params),
            ).fetchall()
        return [_shadow_run(r) for r in rows]

    # -- guardrails ----------------------------------------------------------------------

    def put_guardrails(self, alias: str, config: dict[str, object] | None) -> None:
        """Set (None: remove) an alias's guardrail limits."""
        with self._db.write() as db:
            if config is None:
                db.execute("DELETE FROM guardrails WHERE alias=?", (alias,))
                return
            db.execute(
                "INSERT INTO guardrails (alias, config, updated_at) VALUES (?,?,?) "
                "ON CONFLICT (alias) DO UPDATE SET config=excluded.config, "
                "updated_at=excluded.updated_at",
                (alias, json.dumps(config), time.time()),
            )

    def guardrails(self) -> dict[str, dict[str, object]]:
        with self._db.read() as db:
            rows = db.execute("SELECT alias, config FROM guardrails").fetchall()
        return {str(r[0]): json.loads(str(r[1])) for r in rows}

    def add_event(self, event: GuardrailEvent) -> None:
        with self._db.write() as db:
            _insert_event(db, event)

    def events(self, alias: str) -> list[GuardrailEvent]:
        with self._db.read() as db:
            rows = db.execute(
                "SELECT event_id, alias, variant, rule, detail, created_at FROM "
                "guardrail_events WHERE alias=?",
                (alias,),
            ).fetchall()
        out = [
            GuardrailEvent(
                event_id=str(r[0]),
                alias=str(r[1]),
                variant=str(r[2]),
                rule=str(r[3]),
                detail=json.loads(str(r[4])),
                created_at=float(str(r[5])),
            )
            for r in rows
        ]
        return sorted(out, key=lambda e: e.created_at)


@dataclass(frozen=True)
class RampRecord:
    alias: str
    config: dict[str, Any]  # candidate, steps (percent), every_exposures, every_s
    step: int  # index into steps of the share now in force
    state: str  # "running", "done" (the last step is in force) or "halted" (by a guardrail)
    step_started_at: float
    updated_at: float


def _ramp(row: Sequence[object]) -> RampRecord:
    return RampRecord(
        alias=str(row[0]),
        config=json.loads(str(row[1])),
        step=int(str(row[2])),
        state=str(row[3]),
        step_started_at=float(str(row[4])),
        updated_at=float(str(row[5])),
    )


_RAMP_COLUMNS = "alias, config, step, state, step_started_at, updated_at"


class RampStore:
    """Ramps in the registry's database (schema 4). A step is taken with a conditional
    update, so that of several replicas sharing the database exactly one takes it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(self, alias: str, config: dict[str, Any], now: float) -> RampRecord:
        with self._db.write() as db:
            db.execute(
                f"INSERT INTO ramps ({_RAMP_COLUMNS}) VALUES (?,?,0,'running',?,?) "
                "ON CONFLICT (alias) DO UPDATE SET config=excluded.config, step=0, "
                "state='running', step_started_at=excluded.step_started_at, "
                "updated_at=excluded.updated_at",
                (alias, json.dumps(config), now, now),
            )
        found = self.get(alias)
        assert found is not None
        return found

    def get(self, alias: str) -> RampRecord | None:
        with self._db.read() as db:
            row = db.execute(
                f"SELECT {_RAMP_COLUMNS} FROM ramps WHERE alias=?", (alias,)
            ).fetchone()
        return None if row is None else _ramp(row)

    def all(self) -> list[RampRecord]:
        with self._db.read() as db:
            rows = db.execute(f"SELECT {_RAMP_COLUMNS} FROM ramps").fetchall()
        return [_ramp(r) for r in rows]

    def advance(self, alias: str, from_step: int, to_step: int, state: str, now: float) -> bool:
        """Move the ramp from `from_step` on; False if it is no longer there (another
        replica took the step, or the ramp was removed or replaced)."""
        with self._db.write() as db:
            changed = db.execute(
                "UPDATE ramps SET step=?, state=?, step_started_at=?, updated_at=? "
                "WHERE alias=? AND step=? AND state='running'",
                (to_step, state, now, now, alias, from_step),
            ).rowcount
        return changed == 1

    def delete(self, alias: str) -> bool:
        with self._db.write() as db:
            return db.execute("DELETE FROM ramps WHERE alias=?", (alias,)).rowcount == 1


def _insert_event(db: Connection, event: GuardrailEvent) -> None:
    db.execute(
        "INSERT INTO guardrail_events (event_id, alias, variant, rule, detail, created_at) "
        "VALUES (?,?,?,?,?,?)",
        (
            event.event_id,
            event.alias,
            event.variant,
            event.rule,
            json.dumps(event.detail),
            event.created_at,
        ),
    )
