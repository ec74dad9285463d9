"""Memory: our server against plain `vllm serve`, and the download cache's cap.

    python -m loadtests memory --home /work/cache/loraswap --out build/memory

1. Each system in turn (`--systems ours,vllm`), with the same model, engine knobs (as in
   `loadtests.compare`: bf16, 1 GiB KV cache, `--max-loras`, `--max-cpu-loras`, rank 16,
   32 seqs) and the same `--adapters` adapter names (hard links to the demo adapters):
   started, left idle, driven by the same short closed-loop workload over those adapters
   (`--concurrency` users, `--duration` s after a warm-up), then idle again. The memory of
   its whole process tree (the server and every process under it: vLLM's engine core)
   is sampled every `--interval` s: RSS summed over processes, and PSS (shared pages
   split between the processes sharing them, which RSS counts once per process).
   Reported per phase: peak and steady (median).
2. Download cache (ours only, `--cache-adapters` > 0): a local HTTP server in this
   process serves `--cache-adapters` different adapters (copies of the demo `shout` with
   one weight changed each, so each has its own sha256); the server's download cache is
   capped at `--cache-cap-adapters` of them. All are registered by URL, then each is
   requested (an evicted one is downloaded again). A thread measures the cache folder
   every few ms throughout: the committed entries, and everything under it (downloads
   in progress included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients import Client
from loadtests import servers
from loadtests.bench import (
    MemorySampler,
    dir_size,
    md_table,
    memory_summary,
    progress,
    publish,
    report_head,
    scratch_dir,
)
from loadtests.cli import Scenario, delegate
from loadtests.record import BenchRecord, summarize
from loadtests.runner import Target, Workload, run_phase, warm_up
from loadtests.workload import LengthDist, Popularity

if TYPE_CHECKING:  # server.demo is imported where a run needs it
    from server.demo import DemoAssets

BUDGET_MIB = 300.0
SYSTEMS = ("ours", "vllm", "vllm-fix")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--systems",
        default="ours,vllm",
        help="comma list: ours, vllm (plain), vllm-fix (plain + our LoRA-op plugin)",
    )
    p.add_argument("--adapters", type=int, default=8, help="adapters both serve and use")
    default = servers.EngineKnobs()
    p.add_argument("--max-loras", type=int, default=default.max_loras, help="vLLM, both")
    p.add_argument("--max-cpu-loras", type=int, default=default.max_cpu_loras, help="both")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop users")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds")
    p.add_argument("--idle", type=float, default=5.0, help="idle seconds before/after")
    p.add_argument("--interval", type=float, default=0.5, help="sampling period, s")
    p.add_argument("--cache-adapters", type=int, default=8, help="URL adapters; 0: skip")
    p.add_argument("--cache-cap-adapters", type=float, default=3.0, help="cache cap, adapters")


def check(args: argparse.Namespace) -> str | None:
    args.systems = [s for s in args.systems.split(",") if s]
    if set(args.systems) - set(SYSTEMS):
        return f"systems are {SYSTEMS}"
    return None


def workload(args: argparse.Namespace, names: list[str]) -> Workload:
    return Workload(
        concurrency=args.concurrency,
        duration_s=args.duration,
        adapters=tuple(names),
        registered=len(names),
        popularity=Popularity("uniform"),
        prompt_len=LengthDist.parse("uniform:16:64"),
        output_len=LengthDist.parse("uniform:16:32"),
    )


def measure_system(
    launch: servers.Launch,
    port: int,
    args: argparse.Namespace,
    load: Workload,
    setup: Callable[[str], None] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": launch.name, "label": launch.label}
    progress(f"[{launch.name}] starting ...")
    with servers.running(launch, port, args.out / "logs" / f"memory-{launch.name}.log") as srv:
        out["startup_s"] = round(srv.start_seconds, 1)
        progress(f"[{launch.name}] healthy after {srv.start_seconds:.0f}s")
        if setup is not None:
            setup(srv.url)
        sampler = MemorySampler(srv.proc.pid, args.interval).start()
        try:
            time.sleep(args.idle)
            sampler.phase = "load"
            target = Target(srv.url, admin_key=launch.admin_key, label=launch.name)
            asyncio.run(warm_up(target, load, args.warmup, progress=None))
            phase = asyncio.run(run_phase(target, load, "main", progress=None))
            s = summarize(phase)
            out["load"] = {
                "ok": s.ok,
                "errors": s.errors,
                "cut": s.cancelled,
                "output_tok_per_s": round(s.output_tok_per_s, 1),
            }
            sampler.phase = "after"
            time.sleep(args.idle)
        finally:
            sampler.stop()
    out["samples"] = sampler.samples
    out["idle"] = memory_summary(sampler.samples, "idle")
    out["under_load"] = memory_summary(sampler.samples, "load")
    out["after"] = memory_summary(sampler.samples, "after")
    out["all"] = memory_summary(sampler.samples)
    u = out["under_load"]
    progress(
        f"[{launch.name}] under load: RSS peak {u.get('rss_peak_mib')} MiB, steady "
        f"{u.get('rss_steady_mib')} MiB; PSS peak {u.get('pss_peak_mib')} MiB; "
        f"{out['load']['ok']} requests ok, {out['load']['errors']} errors"
    )
    return out


# -- the download cache ---------------------------------------------------------------


def make_variants(source: Path, root: Path, n: int) -> list[Path]:
    """`n` copies of the adapter at `source`, each with its last weight byte changed
    (a different sha256, still a valid adapter of the same shapes)."""
    out = []
    for i in range(n):
        dst = root / f"v{i:03d}"
        dst.mkdir(parents=True)
        shutil.copy2(source / "adapter_config.json", dst / "adapter_config.json")
        data = bytearray((source / "adapter_model.safetensors").read_bytes())
        data[-1] = (data[-1] + i + 1) % 256
        (dst / "adapter_model.safetensors").write_bytes(bytes(data))
        out.append(dst)
    return out


@contextlib.contextmanager
def file_server(root: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def watch_dir(path: Path, every_s: float = 0.005) -> Iterator[dict[str, int]]:
    """Track the largest sizes seen under `path`: everything (`max_all`), and the cached
    adapters' files alone (`max_committed`: not in a `.staging-*` download in progress,
    not the cache's own `.last-used` marks, counted in `max_marks`)."""
    seen = {"max_all": 0, "max_committed": 0, "max_marks": 0, "samples": 0}
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            total = dir_size(path)
            staged = sum(dir_size(p) for p in path.glob(".staging-*"))
            marks = sum(p.stat().st_size for p in path.glob("*/.last-used") if p.exists())
            seen["max_all"] = max(seen["max_all"], total)
            seen["max_committed"] = max(seen["max_committed"], total - staged - marks)
            seen["max_marks"] = max(seen["max_marks"], marks)
            seen["samples"] += 1
            stop.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def cache_check(
    assets: DemoAssets, args: argparse.Namespace, work: Path, knobs: servers.EngineKnobs
) -> dict[str, Any]:
    source = assets.adapters_dir / "shout"
    variants = make_variants(source, work / "http", args.cache_adapters)
    one = dir_size(variants[0])
    cap = int(args.cache_cap_adapters * one)
    (work / "served").mkdir(parents=True, exist_ok=True)
    storage = work / "storage"
    cache_dir = storage / "cache"
    port = servers.free_port()
    launch = servers.ours(
        assets.base_dir,
        work / "served",
        port,
        knobs,
        home=work / "home-cache",
        admin_key=secrets.token_hex(16),
    )
    launch.env["LORASWAP_STORAGE_DIR"] = str(storage)
    launch.env["LORASWAP_DOWNLOAD_CACHE_BYTES"] = str(cap)
    # The adapters are served from a loopback file server, which sources refuse by default.
    launch.env["LORASWAP_SOURCES__HTTP_ALLOWED_NETWORKS"] = '["127.0.0.1/32"]'
    out: dict[str, Any] = {
        "adapters": len(variants),
        "adapter_bytes": one,
        "cap_bytes": cap,
        "errors": [],
    }
    progress(f"[cache] cap {cap} B ({args.cache_cap_adapters:g} adapters of {one} B)")
    with (
        file_server(work / "http") as base_url,
        servers.running(launch, port, args.out / "logs" / "memory-cache.log") as srv,
        Client(srv.url, admin_key=launch.admin_key, api_key=launch.admin_key, max_retries=0) as c,
        watch_dir(cache_dir) as seen,
    ):
        after_each = []
        for i, v in enumerate(variants):
            c.register_adapter(f"u{i:03d}", f"{base_url}/{v.name}")
            after_each.append(dir_size(cache_dir))
        for rnd in range(2):
            for i in range(len(variants)):
                try:
                    c.chat(f"smollm2:u{i:03d}", [{"role": "user", "content": "hi"}], max_tokens=1)
                except Exception as exc:  # recorded: a refusal is a finding, not a crash
                    out["errors"].append(f"round {rnd} u{i:03d}: {type(exc).__name__}: {exc}")
                after_each.append(dir_size(cache_dir))
        out["size_after_each_call"] = after_each
    out.update(seen)
    out["committed_within_cap"] = seen["max_committed"] <= cap
    out["all_within_cap"] = seen["max_all"] <= cap
    progress(
        f"[cache] largest seen: {seen['max_committed']} B committed, {seen['max_all']} B "
        f"with downloads in progress; cap {cap} B; {len(out['errors'])} request errors"
    )
    return out


def render(record: Mapping[str, Any]) -> str:
    lines = [*_render_head(record), "", _systems_table(record["systems"])]
    if record.get("comparison"):
        lines += ["", _render_comparison(record["comparison"])]
    if record.get("cache"):
        lines += ["", *_render_cache(record["cache"], record["config"])]
    return "\n".join(lines)


def _render_head(record: Mapping[str, Any]) -> list[str]:
    cfg = record["config"]
    return [
        *report_head("Memory: loraswap vs plain vLLM", record),
        "",
        # Records before these flags existed ran at the knobs' defaults.
        "Same model (SmolLM2-135M-Instruct, bf16), KV cache 1 GiB, max_loras "
        f"{cfg.get('max_loras', 4)}, max_cpu_loras {cfg.get('max_cpu_loras', 16)}, "
        f"max_lora_rank 16, max_num_seqs 32, {cfg['adapters']} adapters "
        f"(hard links to the demo adapters); workload: {cfg['concurrency']} users, closed "
        f"loop, uniform over the {cfg['adapters']} adapters, max_tokens 16-32, "
        f"{cfg['warmup']:g} s warm-up + {cfg['duration']:g} s. Memory of the whole process "
        f"tree every {cfg['interval']:g} s, MiB (steady: median of the phase's samples).",
    ]


# The systems table's columns between the label and the requests: (column, phase, measure).
_MEMORY_COLUMNS = [
    ("processes", "under_load", "processes"),
    ("RSS idle", "idle", "rss_steady_mib"),
    ("RSS under load (steady)", "under_load", "rss_steady_mib"),
    ("RSS peak", "under_load", "rss_peak_mib"),
    ("RSS after", "after", "rss_steady_mib"),
    ("PSS idle", "idle", "pss_steady_mib"),
    ("PSS under load (steady)", "under_load", "pss_steady_mib"),
    ("PSS peak", "under_load", "pss_peak_mib"),
]


def _systems_table(systems: list[Mapping[str, Any]]) -> str:
    rows = []
    for s in systems:
        load = s["load"]
        requests = (
            f"{load['ok']} ok / {load['errors']} err / {load.get('cut', 0)} "
            f"cut, {load.get('output_tok_per_s', 0)} tok/s"
        )
        cells = [s[phase].get(measure) for _, phase, measure in _MEMORY_COLUMNS]
        rows.append([s["label"], *cells, requests])
    names = [name for name, _, _ in _MEMORY_COLUMNS]
    return md_table(["system", *names, "requests"], rows, "|".join(names))


def _render_comparison(cmp: Mapping[str, Any]) -> str:
    return (
        f"Target: ours ≤ plain vLLM + {BUDGET_MIB:.0f} MB (total RSS of all processes). "
        f"Peak: ours − vLLM = {cmp['rss_peak_diff_mib']} MiB; steady under load: "
        f"{cmp['rss_steady_diff_mib']} MiB (PSS: {cmp['pss_peak_diff_mib']} / "
        f"{cmp['pss_steady_diff_mib']} MiB): **{'pass' if cmp['pass'] else 'miss'}**."
    )


def _render_cache(c: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            "cached adapters' files",
            c["max_committed"],
            c["cap_bytes"],
            "yes" if c["committed_within_cap"] else "**no**",
        ],
        [
            "everything under the cache folder (downloads being staged and the "
            f"cache's `.last-used` marks, at most {c.get('max_marks', 0)} B, "
            "included)",
            c["max_all"],
            c["cap_bytes"],
            "yes" if c["all_within_cap"] else "**no**",
        ],
    ]
    columns = ["measure", "largest seen (B)", "cap (B)", "within cap"]
    first_error = f" (first: {c['errors'][0]})" if c["errors"] else ""
    return [
        "## Download cache cap",
        "",
        f"{c['adapters']} adapters registered by URL (a local HTTP server), "
        f"{c['adapter_bytes']} B each, cache cap {c['cap_bytes']} B "
        f"({cfg['cache_cap_adapters']:g} adapters); then each requested twice round "
        f"robin (evicted ones are downloaded again). Cache folder size sampled every "
        f"5 ms ({c['samples']} samples):",
        "",
        md_table(columns, rows, "largest seen (B)|cap (B)"),
        "",
        f"Request errors: {len(c['errors'])}{first_error}.",
    ]


def run(args: argparse.Namespace, command: str) -> None:
    from server.demo import demo_assets

    assets = demo_assets(args.home)
    sources = [assets.adapters_dir / n for n in assets.adapter_names]
    bench = BenchRecord.start("memory", command, args)
    record = bench.body
    record["systems"] = []
    knobs = servers.EngineKnobs(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras)
    with scratch_dir("memory") as work:
        pool = servers.make_adapter_pool(work / "adapters", sources, args.adapters)
        names = list(pool)
        (work / "served").mkdir()
        load = workload(args, names)
        for name in args.systems:
            port = servers.free_port()
            if name == "ours":
                launch = servers.ours(
                    assets.base_dir,
                    work / "served",
                    port,
                    knobs,
                    home=work / "home-ours",
                    admin_key=secrets.token_hex(16),
                    allowed_roots=[work / "adapters"],
                )
                key = launch.admin_key

                def setup(url: str, key: str | None = key) -> None:
                    with Client(url, admin_key=key, max_retries=0) as c:
                        for n, folder in pool.items():
                            c.register_adapter(n, str(folder))

                result = measure_system(launch, port, args, load, setup)
            else:
                fix = name == "vllm-fix"
                launch = servers.vllm(assets.base_dir, pool, port, knobs, lora_fix=fix)
                result = measure_system(launch, port, args, load, None)
            record["systems"].append(result)
        by = {s["name"]: s for s in record["systems"]}
        if "ours" in by and "vllm" in by:
            o, v = by["ours"]["under_load"], by["vllm"]["under_load"]
            cmp = {
                f"{k}_{w}_diff_mib": round(o[f"{k}_{w}_mib"] - v[f"{k}_{w}_mib"], 1)
                for k in ("rss", "pss")
                for w in ("peak", "steady")
            }
            cmp["pass"] = cmp["rss_peak_diff_mib"] <= BUDGET_MIB
            record["comparison"] = cmp
        if args.cache_adapters > 0:
            record["cache"] = cache_check(assets, args, work / "cache-check", knobs)
    publish(bench, args.out, render)


SCENARIO = Scenario(
    name="memory",
    help="Memory of our server vs plain vLLM; the download cache's cap.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    check=check,
    out=Path("build/memory"),
    nice=19,
)


if __name__ == "__main__":  # the older form: python -m loadtests.memory
    delegate(SCENARIO.name)
