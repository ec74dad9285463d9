"""Side-by-side comparison on one box and one model, one system after another:

    (d) the base model alone, through our server   (`base`)
    (e) the base model alone, plain vLLM without LoRA (`vllm-base`)
    (a) our server, N registered / K active adapters (`ours`)
    (b) plain `vllm serve --enable-lora`, the K active names (`vllm`)
    (c) the naive transformers + PEFT server, the K active names (`peft`)

    python -m loadtests compare --out build/compare    # the defaults: as below
    python -m loadtests compare --home /work/cache/loraswap --out build/compare \\
        --duration 50 --concurrency 16 --adapters-registered 100 --adapters-active 8 \\
        --zipf-alpha 1.0 --output-len uniform:16:64 --sweep 1,4 --sweep-duration 20 \\
        --swap-every 20 --peft-concurrency 4 --peft-duration 60

Each system is started, warmed up (every active adapter loaded, then `--warmup` seconds of
the same load, unrecorded), measured, and stopped before the next starts, so they never
share the cores. The N adapter folders are hard links to the demo's three adapters under
distinct names (`a000`, `a001`, ...); ours pre-registers all N through the admin API, and
its main phase runs the hot-swap schedule (`--swap-every`; 0 for none) on the most
popular adapter. Sweep points (`--sweep`) measure ours and vLLM again with fewer or more
active adapters (more: the next registered names join), each after `--sweep-warmup`
seconds of its own load, unrecorded. Every system sees the same request sequence (same
seed), the naive one a shorter, lighter run (`--peft-*`).

Writes `results.json` (after every system: a crash keeps what was measured),
`results.md`, the PNG plots and `logs/<system>.log` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from clients import Client, ConflictError
from loadtests import servers
from loadtests.cli import Scenario, delegate
from loadtests.cpu import box_busy_cores
from loadtests.options import SweepPoint, add_workload_args, sweep_points, workload
from loadtests.record import RecordHead, RunRecord, SystemRecord, summarize
from loadtests.report import write_report
from loadtests.runner import Target, Workload, print_progress, run_phase, warm_up
from loadtests.workload import LengthDist, alternating_swaps

if TYPE_CHECKING:
    from server.demo import DemoAssets

SYSTEMS = ("base", "vllm-base", "ours", "vllm", "peft")
# Not run unless named: plain vLLM with our CPU LoRA-op fix plugin left on, which tells
# how much of a difference to plain vLLM comes from the ops alone.
EXTRA_SYSTEMS = ("vllm-fix",)
# Seconds between systems and phases: the engine finishes aborting cut-off requests and
# the machine settles before the next window starts.
PAUSE_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma list, run in this order [{','.join(SYSTEMS)}]; also: "
        f"{', '.join(EXTRA_SYSTEMS)} (plain vLLM with our LoRA-op fix on)",
    )
    parser.add_argument("--adapters-registered", type=int, default=100, help="ours")
    parser.add_argument(
        "--swap-every",
        type=float,
        default=20.0,
        help="ours: hot-swap the most popular adapter every S seconds (0: never)",
    )
    parser.add_argument("--peft-concurrency", type=int, default=4, help="naive server")
    parser.add_argument("--peft-duration", type=float, default=60.0, help="naive server")
    parser.add_argument("--peft-warmup", type=float, default=5.0, help="naive server")
    parser.add_argument(
        "--peft-rate", type=float, default=None, help="naive server, open loop [--rate]"
    )
    parser.add_argument(
        "--peft-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads of the naive server [all cores]",
    )
    parser.add_argument("--max-loras", type=int, default=4, help="vLLM max_loras, both")
    parser.add_argument("--max-cpu-loras", type=int, default=16, help="both")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="both")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.5,
        help="before each phase, wait until the rest of the machine uses fewer cores",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="... but at most this many seconds"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the temp adapter pool")
    add_workload_args(parser)
    # The target scenario: 100 registered, 8 active (Zipf), 16 users; short enough outputs
    # that a slow CPU box still completes requests inside the window.
    parser.set_defaults(
        duration=50.0,
        sweep=sweep_points("1,4"),
        sweep_duration=20.0,
        output_len=LengthDist.parse("uniform:16:64"),
    )


def check(args: argparse.Namespace) -> str | None:
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS) - set(EXTRA_SYSTEMS)
    if unknown:
        known = ", ".join(SYSTEMS + EXTRA_SYSTEMS)
        return f"unknown systems {sorted(unknown)}; known: {known}"
    if not 1 <= args.adapters_active <= args.adapters_registered:
        return "need 1 <= --adapters-active <= --adapters-registered"
    return None


def preregister(target: Target, pool: dict[str, Path]) -> int:
    """Register every folder of the pool through the admin API (else they would register
    on first use only): "N registered" is then true of the registry. Returns the count."""
    with Client(target.url, admin_key=target.admin_key, max_retries=0) as admin:
        for name, folder in pool.items():
            with contextlib.suppress(ConflictError):  # registered already
                admin.register_adapter(name, str(folder))
        return len(admin.list_adapters())


def wait_for_quiet(below: float, at_most_s: float) -> float | None:
    """Wait (up to `at_most_s`) until the machine, our idle server included, uses fewer
    than `below` cores: on a shared machine, start windows in a lull. Returns the last
    reading."""
    deadline = time.monotonic() + at_most_s
    busy = box_busy_cores(2.0)
    while busy is not None and busy >= below and time.monotonic() < deadline:
        busy = box_busy_cores(2.0)
    return busy


def sweep_loads(
    load: Workload, names: Sequence[str], points: Sequence[SweepPoint], duration_s: float
) -> list[tuple[str, Workload]]:
    """The sweep points of `load`: the same requests over the first n of the registered
    `names` (fewer or more than its own active ones), without hot swaps."""
    return [(p.label, replace(p.of(load, names), duration_s=duration_s)) for p in points]


def measure(
    launch: servers.Launch,
    port: int,
    out: Path,
    phases: Sequence[tuple[str, Workload]],
    warmup_s: float,
    setup: Callable[[Target, SystemRecord], None] | None = None,
    quiet: tuple[float, float] = (0.5, 0.0),
    phase_warmup_s: float = 0.0,
) -> SystemRecord:
    """Start one system, warm it up, run its phases, stop it: the first phase after
    `warmup_s` of its load, each later one after `phase_warmup_s` of its own. Failures are
    recorded, not raised: the other systems still run."""
    system = SystemRecord(name=launch.name, label=launch.label, notes=list(launch.notes))
    system.server = {
        "command": " ".join(launch.cmd),
        # The admin key is a throwaway, but a record is no place for keys.
        "env": {k: v for k, v in launch.env.items() if "KEY" not in k},
    }
    print_progress(f"[{launch.label}] starting: {' '.join(launch.cmd[:4])} ...")
    try:
        with servers.running(launch, port, out / "logs" / f"{launch.name}.log") as srv:
            system.url = srv.url
            system.server["startup_s"] = round(srv.start_seconds, 1)
            print_progress(f"[{launch.label}] healthy after {srv.start_seconds:.0f}s")
            target = Target(srv.url, admin_key=launch.admin_key, label=launch.label)
            if setup is not None:
                setup(target, system)
            for i, (name, load) in enumerate(phases):
                warm = warmup_s if i == 0 else phase_warmup_s
                asyncio.run(warm_up(target, replace(load, swaps=()), warm))
                time.sleep(PAUSE_S)
                busy = wait_for_quiet(*quiet)
                if busy is not None:
                    system.server[f"cores busy before {name}"] = round(busy, 2)
                phase = asyncio.run(run_phase(target, load, name, server_sid=srv.proc.pid))
                system.phases.append(phase)
                s = summarize(phase)
                print_progress(
                    f"[{launch.label}] {name}: {s.output_tok_per_s:.1f} tok/s, "
                    f"{s.req_per_s:.2f} req/s, {s.ok} ok / {s.errors} err / "
                    f"{s.cancelled} cut, p50 TTFT {s.ttft_p50_s or float('nan'):.2f}s; "
                    f"cores: server {phase.cpu.get('server_cores', float('nan')):.2f}, "
                    f"others {phase.cpu.get('others_cores', float('nan')):.2f}"
                )
    except Exception as exc:
        system.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        print_progress(f"[{launch.label}] FAILED: {system.error}")
    return system


@dataclass(frozen=True)
class _Bench:
    """What every system of one comparison shares: the adapters, the load, the knobs."""

    args: argparse.Namespace
    assets: DemoAssets
    work: Path  # temporary: the adapter pool and our servers' homes
    pool: dict[str, Path]  # every registered name -> its folder
    main_load: Workload
    sweep: list[SweepPoint]
    knobs: servers.EngineKnobs

    @property
    def names(self) -> list[str]:
        return list(self.pool)

    @property
    def active(self) -> list[str]:
        return self.names[: self.args.adapters_active]

    def served(self) -> dict[str, Path]:
        # Plain vLLM serves only the names it is started with: every one a phase uses.
        return {
            n: self.pool[n]
            for n in self.names[: max([len(self.active), *(p.count for p in self.sweep)])]
        }

    def sweep_phases(self, load: Workload) -> list[tuple[str, Workload]]:
        return sweep_loads(load, self.names, self.sweep, self.args.sweep_duration)

    def base_load(self) -> list[tuple[str, Workload]]:
        return [("main", replace(self.main_load, adapters=(), registered=0))]


@dataclass
class _System:
    """How one system is measured: see `measure`."""

    launch: servers.Launch
    phases: list[tuple[str, Workload]]
    warmup_s: float
    setup: Callable[[Target, SystemRecord], None] | None = None


def _bench(args: argparse.Namespace, assets: DemoAssets, work: Path) -> _Bench:
    sources = [assets.adapters_dir / n for n in assets.adapter_names]
    pool = servers.make_adapter_pool(work / "adapters", sources, args.adapters_registered)
    active = list(pool)[: args.adapters_active]
    knobs = servers.EngineKnobs(
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_num_seqs=args.max_num_seqs,
    )
    return _Bench(
        args=args,
        assets=assets,
        work=work,
        pool=pool,
        main_load=workload(args, active, args.adapters_registered),
        # A point like the main phase is kept: it measures that load without hot swaps.
        sweep=[p for p in args.sweep if p.count <= len(pool)],
        knobs=knobs,
    )


def _our_launch(bench: _Bench, name: str, port: int) -> servers.Launch:
    return servers.ours(
        bench.assets.base_dir,
        bench.work / "adapters",
        port,
        bench.knobs,
        home=bench.work / f"home-{name}",
        admin_key=secrets.token_hex(16),
        allowed_roots=[bench.assets.adapters_dir],
    )


def _base(bench: _Bench, name: str, port: int) -> _System:
    launch = replace(_our_launch(bench, name, port), name="base", label="(d) base alone, loraswap")
    launch.notes = ["our server, every request to the base model (no adapter)"]
    return _System(launch, bench.base_load(), bench.args.warmup)


def _ours(bench: _Bench, name: str, port: int) -> _System:
    args, active, launch = bench.args, bench.active, _our_launch(bench, name, port)
    swaps = []
    if args.swap_every > 0:
        # The most popular adapter gets other demo adapters' weights as new
        # versions, then rollbacks: every swap changes what it serves.
        sources = [bench.assets.adapters_dir / n for n in bench.assets.adapter_names]
        others = [str(s) for s in sources if s != sources[0]]
        swaps = alternating_swaps(active[0], others, args.swap_every, args.duration)
    load = replace(bench.main_load, swaps=tuple(swaps))
    launch.notes = [
        f"{args.adapters_registered} adapters registered (admin API, before the "
        f"run), {len(active)} active; {len(swaps)} hot swaps of {active[0]} "
        "during the main phase (none in sweep points)",
    ]

    def setup(target: Target, system: SystemRecord) -> None:
        count = preregister(target, bench.pool)
        system.server["registered"] = count
        print_progress(f"[{target.label}] {count} adapters registered")

    phases = [("main", load), *bench.sweep_phases(bench.main_load)]
    return _System(launch, phases, args.warmup, setup)


def _vllm_base(bench: _Bench, name: str, port: int) -> _System:
    launch = servers.vllm(bench.assets.base_dir, {}, port, bench.knobs, lora_fix=False, lora=False)
    return _System(launch, bench.base_load(), bench.args.warmup)


def _vllm(bench: _Bench, name: str, port: int) -> _System:
    served = bench.served()
    launch = servers.vllm(
        bench.assets.base_dir, served, port, bench.knobs, lora_fix=name == "vllm-fix"
    )
    # It serves the names it was started with (--lora-modules): that many registered.
    load = replace(bench.main_load, registered=len(served))
    return _System(launch, [("main", load), *bench.sweep_phases(load)], bench.args.warmup)


def _peft(bench: _Bench, name: str, port: int) -> _System:
    args, active = bench.args, bench.active
    active_pool = {n: bench.pool[n] for n in active}
    launch = servers.peft(bench.assets.base_dir, active_pool, port, bench.knobs, args.peft_threads)
    load = replace(
        bench.main_load,
        registered=len(active),
        concurrency=args.peft_concurrency,
        duration_s=args.peft_duration,
        rate=args.peft_rate or args.rate,
    )
    return _System(launch, [("main", load)], args.peft_warmup)


# How each system is started and what it runs (`check` accepts exactly these names).
_SYSTEMS: dict[str, Callable[[_Bench, str, int], _System]] = {
    "base": _base,
    "vllm-base": _vllm_base,
    "ours": _ours,
    "vllm": _vllm,
    "peft": _peft,
    "vllm-fix": _vllm,
}


def _demo_assets(home: Path) -> DemoAssets:
    from server.demo import demo_assets

    assets = demo_assets(home)
    sources = [assets.adapters_dir / n for n in assets.adapter_names]
    if not assets.base_dir.is_dir() or not all(s.is_dir() for s in sources):
        sys.exit(
            f"demo assets missing under {home}/demo: run `loraswap demo prepare` or pass --home"
        )
    return assets


def run(args: argparse.Namespace, command: str) -> None:
    assets = _demo_assets(args.home)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(**RecordHead.fields_now(command, args))
    quiet = (args.quiet_below, args.quiet_wait)
    work = Path(tempfile.mkdtemp(prefix="loraswap-compare-"))
    try:
        bench = _bench(args, assets, work)
        for name in args.systems:
            port = servers.free_port()
            plan = _SYSTEMS[name](bench, name, port)
            system = measure(
                plan.launch,
                port,
                out,
                plan.phases,
                plan.warmup_s,
                plan.setup,
                quiet,
                args.sweep_warmup,
            )
            record.systems.append(system)
            record.write(out / "results.json")
            time.sleep(PAUSE_S)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        if record.systems:
            record.write(out / "results.json")
            report = write_report(record, out)
            print_progress(f"wrote {out / 'results.json'}, {report} and the plots")
            print(report.read_text())


SCENARIO = Scenario(
    name="compare",
    help="Compare loraswap with plain vLLM, a naive PEFT server and the base alone.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    check=check,
    out=Path("build/compare"),
    nice=10,
)


if __name__ == "__main__":  # the older form: python -m loadtests.compare
    delegate(SCENARIO.name)
