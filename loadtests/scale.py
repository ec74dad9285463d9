"""Registry scale: do request latency, `/v1/models` and the server's memory stay flat as
the registry grows to 10,000 adapters?

    python -m loadtests scale --home /work/cache/loraswap --out build/scale

One server (bf16, the demo model, no adapters folder). For each count of `--counts`
(ascending), adapters are registered through the admin API up to that count (many names,
one source folder: the demo `pirate`, so registering costs its validation and the
database commit, not disk), `--register-concurrency` calls at a time on the async client.
Then, one request at a time: `--requests` `GET /v1/models` (latency and payload), base
chat requests and adapter chat requests (max_tokens `--max-tokens`, greedy; the adapter
requests cycle over the first `--hot` adapters, already loaded: this measures lookup, not
loading), and the memory of the server's process tree (RSS and PSS summed over the
server and every process under it, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from clients import AsyncClient, Client
from loadtests import servers
from loadtests.bench import (
    demo_adapter,
    md_table,
    proc_cpu_s,
    process_tree_memory,
    progress,
    publish,
    report_head,
    scratch_dir,
    stats_ms,
)
from loadtests.cli import Scenario, delegate, scenario_args
from loadtests.cpu import CpuMeter
from loadtests.options import ascending_counts
from loadtests.record import BenchRecord

PROMPT = [{"role": "user", "content": "Say hello."}]
RSS_BUDGET_MIB = 50.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--counts",
        type=ascending_counts,
        default=[1, 100, 1000, 10000],
        help="registered adapters at each point",
    )
    p.add_argument("--source", default="pirate", help="demo adapter every name points at")
    p.add_argument("--requests", type=int, default=30, help="/v1/models calls per count")
    p.add_argument("--chat-requests", type=int, default=15, help="of each chat kind")
    p.add_argument("--max-tokens", type=int, default=4, help="of the chat requests")
    p.add_argument("--hot", type=int, default=1, help="adapters the adapter requests use")
    p.add_argument("--register-concurrency", type=int, default=8, help="admin calls at a time")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return scenario_args("scale", argv)


async def register_up_to(
    url: str, admin_key: str, source: str, start: int, stop: int, concurrency: int
) -> float:
    """Register `name(start)` .. `name(stop - 1)`; returns the seconds it took."""
    todo = iter(range(start, stop))
    t0 = time.perf_counter()
    async with AsyncClient(url, admin_key=admin_key, max_retries=3) as c:

        async def worker() -> None:
            for i in todo:
                await c.register_adapter(name(i), source)
                if (i + 1) % 1000 == 0:
                    progress(f"  {i + 1} registered")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


def name(i: int) -> str:
    return f"s{i:05d}"


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _kind(pid: int, calls: list[Callable[[], Any]]) -> tuple[list[float], float]:
    """Latency of each call, one at a time, and the API server's CPU ms per call (its own
    process, engine excluded: what the registry's size could cost a request, measured
    in CPU time, which a busy neighbour on a shared machine does not inflate)."""
    cpu0 = proc_cpu_s(pid)
    times = []
    for call in calls:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times, round(1000 * (proc_cpu_s(pid) - cpu0) / len(calls), 2)


def measure(
    c: Client, http: httpx.Client, args: argparse.Namespace, count: int, pid: int
) -> dict[str, Any]:
    meter = CpuMeter(os.getsid(pid)).start()
    sizes, listed = [], [0]

    def models() -> None:
        r = http.get("/v1/models")
        r.raise_for_status()
        sizes.append(len(r.content))
        listed[0] = len(r.json()["data"])

    hot = [f"smollm2:{name(i)}" for i in range(min(args.hot, count))]

    def chat(model: str) -> Callable[[], Any]:
        return lambda: c.chat(model, PROMPT, max_tokens=args.max_tokens, temperature=0)

    models_s, models_cpu = _kind(pid, [models] * args.requests)
    base_s, base_cpu = _kind(pid, [chat("smollm2")] * args.chat_requests)
    adapter_s, adapter_cpu = _kind(
        pid, [chat(hot[i % len(hot)]) for i in range(args.chat_requests)]
    )
    t0 = time.perf_counter()
    admin_list = http.get("/admin/adapters")
    admin_s = time.perf_counter() - t0
    return {
        "models": {
            **stats_ms(models_s),
            "bytes": sizes[-1],
            "entries": listed[0],
            "server_cpu_ms_per_call": models_cpu,
        },
        "base_chat": {**stats_ms(base_s), "server_cpu_ms_per_call": base_cpu},
        "adapter_chat": {**stats_ms(adapter_s), "server_cpu_ms_per_call": adapter_cpu},
        "admin_list": {"ms": round(1000 * admin_s, 1), "bytes": len(admin_list.content)},
        "cpu": meter.stop(),
    }


def render(record: Mapping[str, Any]) -> str:
    points, cfg, mem = record["points"], record["config"], record["rss_added_by_registrations_mib"]
    lines = [
        *_render_head(record),
        "",
        md_table(_LATENCY_COLUMNS, [_latency_row(p) for p in points], "auto"),
        "",
        "Memory of the server's process tree (the API server and the engine process), MiB, "
        "after each point's requests; deltas from the first point. Registration: "
        f"{cfg['register_concurrency']} admin calls at a time.",
        "",
        md_table(_MEMORY_COLUMNS, [_memory_row(p) for p in points], "auto"),
        "",
        f"Target: registrations add ≤ {RSS_BUDGET_MIB:.0f} MB of RSS: "
        f"{mem['rss']} MiB RSS ({mem.get('pss')} MiB PSS) from "
        f"{points[0]['registered']} to {points[-1]['registered']} "
        f"registered: **{'pass' if record['rss_pass'] else 'miss'}**.",
    ]
    return "\n".join(lines)


def _render_head(record: Mapping[str, Any]) -> list[str]:
    cfg = record["config"]
    return [
        *report_head("Registry scale", record, torch=False),
        "",
        "Latency in ms, one request at a time, "
        f"{cfg['requests']} `/v1/models` and "
        f"{cfg['chat_requests']} chat requests of each kind per point; max_tokens "
        f"{cfg['max_tokens']}, greedy; the adapter requests go to an adapter "
        "already loaded. `/admin/adapters`: one call (the full listing). API CPU/call: CPU ms "
        "the API server process (engine excluded) spent per call, which a busy neighbour "
        "does not inflate; others' cores: what the rest of the machine used meanwhile.",
    ]


_LATENCY_COLUMNS = [
    "registered",
    "/v1/models p50",
    "/v1/models p99",
    "/v1/models size",
    "base chat p50",
    "base chat p99",
    "adapter chat p50",
    "adapter chat p99",
    "/admin/adapters",
    "API CPU/call: /v1/models",
    "base chat",
    "adapter chat",
    "others' cores",
]


def _latency_row(p: Mapping[str, Any]) -> list[Any]:
    m, b, a = p["models"], p["base_chat"], p["adapter_chat"]
    return [
        p["registered"],
        m["p50_ms"],
        m["p99_ms"],
        f"{m['bytes'] / 1024:.0f} KiB",
        b["p50_ms"],
        b["p99_ms"],
        a["p50_ms"],
        a["p99_ms"],
        p["admin_list"]["ms"],
        m["server_cpu_ms_per_call"],
        b["server_cpu_ms_per_call"],
        a["server_cpu_ms_per_call"],
        p["cpu"].get("others_cores"),
    ]


_MEMORY_COLUMNS = [
    "registered",
    "RSS",
    "PSS",
    "RSS delta",
    "PSS delta",
    "processes",
    "registering took (s)",
    "registrations/s",
]


def _memory_row(p: Mapping[str, Any]) -> list[Any]:
    memory = p["memory"]
    return [
        p["registered"],
        memory["rss_mib"],
        memory.get("pss_mib"),
        memory["rss_delta_mib"],
        memory.get("pss_delta_mib"),
        memory["processes"],
        p.get("register_s"),
        p.get("register_per_s"),
    ]


def run(args: argparse.Namespace, command: str) -> None:
    from server.demo import demo_assets

    source = demo_adapter(args.home, args.source)
    assets = demo_assets(args.home)
    result = BenchRecord.start("scale", command, args)
    record = result.body
    record["points"] = []
    admin_key = secrets.token_hex(16)
    with scratch_dir("scale") as work:
        (work / "served").mkdir()
        port = servers.free_port()
        launch = servers.ours(
            assets.base_dir,
            work / "served",
            port,
            servers.EngineKnobs(),
            home=work / "home",
            admin_key=admin_key,
            allowed_roots=[assets.adapters_dir],
        )
        progress("starting the server ...")
        with servers.running(launch, port, args.out / "logs" / "scale-server.log") as srv:
            progress(f"healthy after {srv.start_seconds:.0f}s")
            record["server_startup_s"] = round(srv.start_seconds, 1)
            _points(srv, admin_key, source, args, record["points"])
    last = record["points"][-1]["memory"]
    record["rss_added_by_registrations_mib"] = {
        "rss": last.get("rss_delta_mib"),
        "pss": last.get("pss_delta_mib"),
    }
    record["rss_pass"] = (last.get("rss_delta_mib") or 0.0) <= RSS_BUDGET_MIB
    publish(result, args.out, render)


def _points(
    srv: servers.Running,
    admin_key: str,
    source: Path,
    args: argparse.Namespace,
    points: list[dict[str, Any]],
) -> None:
    """Grow the registry through `args.counts`, measuring at each count (into `points`)."""
    registered = 0
    with (
        Client(srv.url, admin_key=admin_key, api_key=admin_key, max_retries=0) as c,
        httpx.Client(
            base_url=srv.url, headers={"authorization": f"Bearer {admin_key}"}, timeout=300
        ) as http,
    ):
        for _ in range(3):  # warm-up: compilation, first steps
            c.chat("smollm2", PROMPT, max_tokens=args.max_tokens, temperature=0)
        for count in args.counts:
            point: dict[str, Any] = {"registered": count}
            took = asyncio.run(
                register_up_to(
                    srv.url, admin_key, str(source), registered, count, args.register_concurrency
                )
            )
            if count > registered:
                point["register_s"] = round(took, 1)
                point["register_per_s"] = round((count - registered) / took, 1)
            registered = count
            progress(f"{count} registered ({took:.1f}s); measuring ...")
            gc.collect()
            point.update(measure(c, http, args, count, srv.proc.pid))
            point["memory"] = _memory(srv.proc.pid, points[0]["memory"] if points else None)
            points.append(point)
            progress(
                f"{count}: /v1/models p50 {point['models']['p50_ms']} ms "
                f"({point['models']['bytes']} B), base p50 "
                f"{point['base_chat']['p50_ms']} ms, adapter p50 "
                f"{point['adapter_chat']['p50_ms']} ms, RSS "
                f"{point['memory']['rss_mib']} MiB"
            )


def _memory(pid: int, first: Mapping[str, Any] | None) -> dict[str, Any]:
    """The server tree's memory now, MiB, with its change since `first` (None: this is
    the first point, so its deltas are 0)."""
    mem = process_tree_memory(pid)
    now: dict[str, Any] = {
        "rss_mib": round(mem["rss"] / 2**20, 1),
        "pss_mib": round(mem["pss"] / 2**20, 1) if "pss" in mem else None,
        "processes": mem["processes"],
    }
    first = now if first is None else first
    for key in ("rss", "pss"):
        if now.get(f"{key}_mib") is not None and first.get(f"{key}_mib") is not None:
            now[f"{key}_delta_mib"] = round(now[f"{key}_mib"] - first[f"{key}_mib"], 1)
    return now


SCENARIO = Scenario(
    name="scale",
    help="Latency, /v1/models and memory against the number of registered adapters.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    out=Path("build/scale"),
    nice=19,
)


if __name__ == "__main__":  # the older form: python -m loadtests.scale
    delegate(SCENARIO.name)
