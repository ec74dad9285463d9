"""The server's own overhead, two code versions side by side in one run: p50 TTFT and the
API process's CPU per request, at 1 and N users, base and adapter.

    git worktree add /tmp/loraswap-old <commit>      # the version to compare with
    python -m loadtests overhead --old /tmp/loraswap-old --out build/overhead

Each version is started from its own source tree (same venv, same demo model and
adapters, same engine settings), measured, and stopped; then the other; `--rounds`
alternates them (old, new, old, new) so that a drift of the machine hits both. Streaming
chat requests, fixed output length (`ignore_eos`), closed loop. "API CPU" is the CPU time
of the server's own process (HTTP, routing, the OpenAI layer; not vLLM's engine core or
worker processes) over the window, divided by the requests finished in it.
Writes `results.json` and `results.md` to `--out`. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests import servers
from loadtests.bench import proc_cpu_s
from loadtests.cli import Scenario, delegate
from loadtests.record import BenchRecord, summarize
from loadtests.runner import Target, Workload, run_phase, warm_up
from loadtests.workload import LengthDist

if TYPE_CHECKING:  # server.demo is imported where a run needs it
    from server.demo import DemoAssets

ADAPTER = "pirate"


def _launch(tree: Path, assets: DemoAssets, port: int, home: Path) -> servers.Launch:
    launch = servers.ours(
        assets.base_dir, assets.adapters_dir, port, servers.EngineKnobs(), home, "overhead-k"
    )
    # This tree's code first on the path, in the server and in vLLM's processes it spawns.
    launch.env["PYTHONPATH"] = str(tree)
    return launch


async def _measure(url: str, pid: int, users: int, adapter: bool, seconds: float) -> dict[str, Any]:
    target = Target(url=url, admin_key="overhead-k", model_format="{base}:{adapter}")
    workload = Workload(
        concurrency=users,
        duration_s=seconds,
        adapters=(ADAPTER,) if adapter else (),
        base_fraction=0.0 if adapter else 1.0,
        prompt_len=LengthDist.parse("32"),
        output_len=LengthDist.parse("32"),
    )
    await warm_up(target, workload, 5.0, progress=None)
    cpu0 = proc_cpu_s(pid)
    phase = await run_phase(target, workload, progress=None)
    cpu = proc_cpu_s(pid) - cpu0
    s = summarize(phase)
    return {
        "requests": s.ok,
        "errors": s.errors,
        "ttft_p50_ms": None if s.ttft_p50_s is None else round(1000 * s.ttft_p50_s, 1),
        "api_cpu_ms_per_request": round(1000 * cpu / max(1, s.ok), 2),
        "output_tok_per_s": round(s.output_tok_per_s, 1),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--old", type=Path, required=True, help="source tree of the old version")
    p.add_argument(
        "--new", type=Path, default=Path.cwd(), help="source tree of the new one [this folder]"
    )
    p.add_argument("--users", default="1,16", help="closed-loop users, comma separated")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per point")
    p.add_argument("--rounds", type=int, default=2, help="old/new alternations")


def run(args: argparse.Namespace, command: str) -> None:
    from server.demo import demo_assets

    assets = demo_assets(args.home)
    args.out.mkdir(parents=True, exist_ok=True)
    result = BenchRecord.start("overhead", command, args)
    record = result.body
    users = [int(u) for u in args.users.split(",")]
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for version, tree in (("old", args.old), ("new", args.new)):
            port = servers.free_port()
            with tempfile.TemporaryDirectory() as home:
                launch = _launch(tree.resolve(), assets, port, Path(home))
                log = args.out / "logs" / f"{version}-{rnd}.log"
                with servers.running(launch, port, log) as running:
                    for n in users:
                        for adapter in (False, True):
                            point = asyncio.run(
                                _measure(running.url, running.proc.pid, n, adapter, args.seconds)
                            )
                            row = {"round": rnd, "version": version, "users": n,
                                   "model": "adapter" if adapter else "base", **point}  # fmt: skip
                            print(json.dumps(row), flush=True)
                            rows.append(row)
                            record["rows"] = rows
                            (args.out / "results.json").write_text(
                                json.dumps(result.to_dict(), indent=2)
                            )
    lines = [
        "| users | model | version | p50 TTFT ms (per round) | API CPU ms/request (per round) "
        "| output tok/s (per round) |",
        "|--:|---|---|---|---|---|",
    ]
    for n in users:
        for model in ("base", "adapter"):
            for version in ("old", "new"):
                sel = [
                    r for r in rows if (r["users"], r["model"], r["version"]) == (n, model, version)
                ]
                lines.append(
                    f"| {n} | {model} | {version} | "
                    + " / ".join(str(r["ttft_p50_ms"]) for r in sel)
                    + " | "
                    + " / ".join(str(r["api_cpu_ms_per_request"]) for r in sel)
                    + " | "
                    + " / ".join(str(r["output_tok_per_s"]) for r in sel)
                    + " |"
                )
    table = "\n".join(lines)
    load = os.getloadavg()
    (args.out / "results.md").write_text(
        f"{table}\n\nload average at the end (1/5/15 min): {load}\n"
    )
    print(table)


SCENARIO = Scenario(
    name="overhead",
    help="Server overhead: two code versions side by side.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    out=Path("build/overhead"),
)


if __name__ == "__main__":  # the older form: python -m loadtests.overhead
    delegate(SCENARIO.name)
