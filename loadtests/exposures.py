"""The exposure log's cost (issue 15's benchmark), two parts, one command:

    python -m loadtests exposures --out build/exposures

1. **Hot path**: the same server with the exposure log on and off
   (`LORASWAP_EXPERIMENTS__EXPOSURE_LOG`), side by side: started, measured and stopped in
   turn, `--rounds` times in the order off, on, on, off, ... so that a drift of the
   machine hits both. Closed loop, `--users` concurrent clients, streaming chat through
   an alias `ab` (pirate 50 / formal 50) with `--end-users` distinct `user`s: throughput,
   p50/p99 latency, p50 TTFT, the API process's CPU per request, and the exposures the
   server says it wrote (so that "on" is seen to be on).
2. **Write rate**: the exposure log's writer path (`ExperimentStore.add_exposures`, one
   transaction per batch of `batch_size` rows, as the background writer calls it) for
   `--write-seconds`, on an SQLite file and on PostgreSQL: rows/s sustained. PostgreSQL
   is `--postgres-url`, or a throwaway server started like the tests' (tests/databases.py)
   but with fsync on: a write rate without durability would flatter it.

Writes `results.json` and `results.md` to `--out`. A benchmark, not a test: run it on a
quiet box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from adapters_registry.experiments import ExperimentStore, Exposure
from adapters_registry.store import Store
from loadtests import servers
from loadtests.bench import md_table, metric_value, proc_cpu_s
from loadtests.cli import Scenario, delegate
from loadtests.record import BenchRecord, summarize
from loadtests.runner import Target, Workload, run_phase, warm_up
from loadtests.workload import LengthDist
from server.settings import ExperimentsSettings

if TYPE_CHECKING:  # server.demo is imported where a run needs it
    from server.demo import DemoAssets

ADMIN_KEY = "exposures-k"
ALIAS = "ab"
ARMS = {"pirate": 50, "formal": 50}
MODES = ("off", "on")


# -- 1. hot path ------------------------------------------------------------------------


def _launch(assets: DemoAssets, port: int, home: Path, log_on: bool) -> servers.Launch:
    launch = servers.ours(
        assets.base_dir, assets.adapters_dir, port, servers.EngineKnobs(), home, ADMIN_KEY
    )
    launch.env["LORASWAP_EXPERIMENTS__EXPOSURE_LOG"] = "true" if log_on else "false"
    return launch


async def _measure(
    url: str, pid: int, users: int, end_users: int, seconds: float
) -> dict[str, Any]:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=admin, timeout=60) as http:
        for arm in ARMS:  # adapters-directory folders register on their first request
            hello = {"model": f"smollm2:{arm}", "max_tokens": 1}
            hello["messages"] = [{"role": "user", "content": "Hi"}]
            (await http.post("/v1/chat/completions", json=hello)).raise_for_status()
        r = await http.put(f"/admin/aliases/{ALIAS}", json={"variants": ARMS})
        r.raise_for_status()
        target = Target(url=url, admin_key=ADMIN_KEY, model_format="{base}:{adapter}")
        workload = Workload(
            concurrency=users,
            duration_s=seconds,
            adapters=(ALIAS,),
            users=end_users,
            prompt_len=LengthDist.parse("uniform:16:64"),
            output_len=LengthDist.parse("32"),
        )
        await warm_up(target, workload, 10.0, progress=None)
        written0 = metric_value(
            (await http.get("/metrics")).text, "loraswap_exposures_written_total"
        )
        cpu0 = proc_cpu_s(pid)
        phase = await run_phase(target, workload, progress=None)
        cpu = proc_cpu_s(pid) - cpu0
        # The writer flushes every flush_interval_s: wait for the window's last rows.
        await asyncio.sleep(2 * ExperimentsSettings().flush_interval_s)
        written = (
            metric_value((await http.get("/metrics")).text, "loraswap_exposures_written_total")
            - written0
        )
    s = summarize(phase)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 1)

    return {
        "requests": s.ok,
        "errors": s.errors,
        "req_per_s": round(s.req_per_s, 2),
        "output_tok_per_s": round(s.output_tok_per_s, 1),
        "latency_p50_ms": ms(s.latency_p50_s),
        "latency_p99_ms": ms(s.latency_p99_s),
        "ttft_p50_ms": ms(s.ttft_p50_s),
        "api_cpu_ms_per_request": round(1000 * cpu / max(1, s.ok), 2),
        "exposures_written": int(written),
    }


def hot_path(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from server.demo import demo_assets

    assets = demo_assets(args.home)
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        # ABBA: off, on, on, off, ...
        for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
            port = servers.free_port()
            with tempfile.TemporaryDirectory() as home:
                launch = _launch(assets, port, Path(home), mode == "on")
                log = out / "logs" / f"{mode}-{rnd}.log"
                with servers.running(launch, port, log) as running:
                    point = asyncio.run(
                        _measure(
                            running.url, running.proc.pid, args.users, args.end_users, args.seconds
                        )
                    )
            row = {"round": rnd, "exposure_log": mode, **point}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def hot_path_table(rows: Sequence[dict[str, Any]]) -> str:
    keys = ("req_per_s", "output_tok_per_s", "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms",
            "api_cpu_ms_per_request")  # fmt: skip
    mean: dict[str, dict[str, float]] = {}
    for mode in MODES:
        sel = [r for r in rows if r["exposure_log"] == mode]
        mean[mode] = {
            k: statistics.fmean(float(r[k]) for r in sel if r[k] is not None) for k in keys
        }
    table = md_table(
        ["exposure log", *keys, "errors", "exposures written"],
        [
            [
                mode,
                *(round(mean[mode][k], 2) for k in keys),
                sum(r["errors"] for r in rows if r["exposure_log"] == mode),
                sum(r["exposures_written"] for r in rows if r["exposure_log"] == mode),
            ]
            for mode in MODES
        ],
        numeric="auto",
    )
    on, off = mean["on"], mean["off"]
    diff = {k: on[k] - off[k] for k in keys}
    verdict = (
        f"on vs off: throughput {on['req_per_s'] / off['req_per_s'] - 1:+.1%} "
        f"(goal: under 2% lower), p50 latency {diff['latency_p50_ms']:+.1f} ms "
        f"(goal: under +1 ms), p99 latency {diff['latency_p99_ms']:+.1f} ms, "
        f"API CPU {diff['api_cpu_ms_per_request']:+.2f} ms/request"
    )
    return f"{table}\n\n{verdict}\n"


# -- 2. write rate ------------------------------------------------------------------------


def _exposures(n: int) -> list[Exposure]:
    now = time.time()
    return [
        Exposure(
            exposure_id=uuid.uuid4().hex,
            response_id=f"chatcmpl-{uuid.uuid4().hex}",
            request_id=uuid.uuid4().hex,
            alias=ALIAS,
            variant="pirate",
            adapter="pirate",
            version=1,
            content_digest="0" * 64,
            tenant="acme",
            user_hash=uuid.uuid4().hex * 2,
            created_at=now,
            status=200,
            prompt_tokens=40,
            completion_tokens=32,
            ttft_s=0.2,
            latency_s=1.5,
        )
        for _ in range(n)
    ]


def write_rate(target: str | Path, seconds: float) -> dict[str, Any]:
    """Rows/s through the writer's call, batch after batch, for `seconds`."""
    store = ExperimentStore(Store(target).database)
    batch = ExperimentsSettings().batch_size
    rows = 0
    batches: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = _exposures(batch)  # fresh ids: every row is an insert
        t0 = time.perf_counter()
        store.add_exposures(chunk)
        batches.append(time.perf_counter() - t0)
        rows += batch
    busy = sum(batches)
    return {
        "rows": rows,
        "batch_size": batch,
        "rows_per_s": round(rows / busy),
        "batch_p50_ms": round(1000 * statistics.median(batches), 1),
        "batch_max_ms": round(1000 * max(batches), 1),
    }


def record_cost(calls: int = 20_000) -> dict[str, Any]:
    """What the exposure log adds to a request on the event loop: `ExposureLog.record`
    (the row built, the per-arm metrics listener, the queue) per call, in microseconds.
    The database write is a worker thread's, in batches (part 2)."""
    from server.experiments.log import ExposureLog
    from server.metrics import Metrics, RequestInfo

    with tempfile.TemporaryDirectory() as tmp:
        store = ExperimentStore(Store(Path(tmp) / "r.db").database)
        metrics = Metrics()
        settings = ExperimentsSettings(queue_max=calls + 1, batch_size=calls + 1)
        log = ExposureLog(store, settings, metrics)
        log.listeners.append(metrics.observe_exposure)
        infos = [
            RequestInfo(
                request_id=uuid.uuid4().hex,
                method="POST",
                path="/v1/chat/completions",
                started=0.0,
                status=200,
                alias=ALIAS,
                variant=("pirate", "formal")[i % 2],
                adapter="pirate",
                version="1",
                response_id=f"chatcmpl-{i}",
                digest="0" * 64,
                user_hash="1" * 64,
                prompt_tokens=40,
                completion_tokens=32,
                ttft_s=0.2,
                ended=1.5,
            )
            for i in range(calls)
        ]
        start = time.perf_counter()
        for info in infos:
            log.record(info)
        took = time.perf_counter() - start
    return {"calls": calls, "us_per_request": round(1e6 * took / calls, 2)}


@contextmanager
def _postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    # The tests' throwaway server (in the source tree, not the installed package).
    from tests.databases import PostgresServer

    server = PostgresServer.start(durable=True)
    try:
        yield server.new_database()
    finally:
        server.stop()


def write_rates(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(
            {"database": "SQLite (file)", **write_rate(Path(tmp) / "r.db", args.write_seconds)}
        )
    with _postgres(args.postgres_url) as url:
        rows.append({"database": "PostgreSQL", **write_rate(url, args.write_seconds)})
    for row in rows:
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=16, help="closed-loop clients")
    p.add_argument("--end-users", type=int, default=1000, help="distinct `user`s they name")
    p.add_argument("--seconds", type=float, default=60.0, help="measured window per point")
    p.add_argument("--rounds", type=int, default=4, help="off/on runs (ABBA order)")
    p.add_argument("--write-seconds", type=float, default=15.0, help="write-rate window")
    p.add_argument("--postgres-url", help="a PostgreSQL database (default: a throwaway one)")
    p.add_argument("--skip-hot-path", action="store_true", help="only the write rate")


def run(args: argparse.Namespace, command: str) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result = BenchRecord.start("exposures", command, args)
    record = result.body
    parts = []
    if not args.skip_hot_path:
        record["hot_path"] = hot_path(args, out)
        parts.append("## Hot path: exposure log on vs off\n\n" + hot_path_table(record["hot_path"]))
    record["record_cost"] = cost = record_cost()
    parts.append(
        f"## On the event loop\n\n`ExposureLog.record` (row, per-arm metrics, queue): "
        f"{cost['us_per_request']} µs per request ({cost['calls']:,} calls)."
    )
    record["write_rate"] = write_rates(args)
    parts.append(
        "## Write rate (rows/s sustained, one transaction per batch)\n\n"
        + md_table(
            ["database", "rows", "batch", "rows/s", "batch p50 ms", "batch max ms"],
            [
                [
                    r["database"],
                    r["rows"],
                    r["batch_size"],
                    r["rows_per_s"],
                    r["batch_p50_ms"],
                    r["batch_max_ms"],
                ]
                for r in record["write_rate"]
            ],
            numeric="auto",
        )
    )
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    load = os.getloadavg()
    text = "\n\n".join(parts) + f"\n\nload average at the end (1/5/15 min): {load}\n"
    (out / "results.md").write_text(text)
    print(text)


SCENARIO = Scenario(
    name="exposures",
    help="The exposure log's cost: hot path and write rate.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    out=Path("build/exposures"),
)


if __name__ == "__main__":  # the older form: python -m loadtests.exposures
    delegate(SCENARIO.name)
