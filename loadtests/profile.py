"""Where the server's time goes under a load: py-spy on every process of the server.

    python -m loadtests profile --out build/profile                 # 128 active of 1,000
    python -m loadtests profile --systems base,ours --adapters-registered 100 \\
        --adapters-active 8 --popularity zipf --duration 30
    LORASWAP_ENGINE__LORA_FAST=false python -m loadtests profile ...  # the fast path off

Per system (`base`: our server, every request to the base model; `ours`: the adapter
load), as `compare` does: start it, register the adapter pool, warm up, then run the load
for `--duration` seconds while `py-spy record --nonblocking` samples every process of the
server's tree at `--sample-rate` Hz. Each sample goes to the category of the innermost frame
that names one (`CATEGORIES`, checked in order: LoRA frames sit inside the linear
layers' frames, so the innermost match is the work being done). The report gives, per
process and category, the share of the process's wall time and the milliseconds it costs
per output token of the load (samples / rate / tokens); wall time no Python thread was
sampled in is "idle". Writes `profile.json`, `profile.md` and the raw stacks
(`<system>-<pid>.txt`, py-spy's raw format, for flame graphs) to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from loadtests import servers
from loadtests.cli import Scenario, delegate
from loadtests.compare import preregister
from loadtests.options import add_workload_args, workload
from loadtests.record import summarize
from loadtests.runner import Target, print_progress, run_phase, warm_up
from loadtests.workload import LengthDist

SYSTEMS = ("base", "ours")

# (category, substrings of a frame "function (file:line)"): the innermost frame of a
# sample that contains one of them decides its category; first match in this order.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LoRA math (fast path: apply.py)", ("server/engine/lora/apply.py",)),
    ("LoRA weights copied out / stacked (pack.py)", ("server/engine/lora/pack.py",)),
    ("LoRA step plan (plan.py)", ("server/engine/lora/plan.py",)),
    ("LoRA per-op path (ops.py, kernels.py)", ("lora/ops.py", "lora/kernels.py")),
    ("LoRA logits (skipped unless lm_head)", ("add_lora_logits",)),
    (
        "LoRA slot activation (vLLM copies into slots)",
        ("activate_adapter", "set_lora ", "reset_lora"),
    ),
    (
        "LoRA adapter loads (disk, vLLM LRU)",
        ("_load_adapter", "from_local_checkpoint", "from_lora_tensors", "add_adapter",
         "WeightsMapper", "safetensors", "remove_adapter"),
    ),
    (
        "LoRA wrapper and mapping metadata",
        ("server/engine/lora/", "punica_wrapper/", "set_active_adapters", "convert_mapping",
         "set_adapter_mapping", "lora/layers/"),
    ),
    ("attention", ("attention", "attn")),
    (
        "base GEMMs (linear layers)",
        ("layers/linear.py", "onednn", "quantization/", "cpu_gemm", "unquantized_gemm"),
    ),
    ("sampling and logits", ("sample", "logits_processor", "compute_logits")),
    (
        "norms, rotary, activations, embeddings",
        ("layernorm", "rotary_embedding", "activation", "silu", "vocab_parallel_embedding"),
    ),
    ("other model code", ("model_executor/models/",)),
    ("input preparation", ("_prepare_inputs", "_update_states", "prepare_", "input_batch")),
    ("scheduler and engine loop", ("v1/core/", "scheduler", "engine/core.py")),
    (
        "serving (API, tokenizer, routing)",
        ("entrypoints/", "server/", "starlette", "uvicorn", "fastapi", "tokeniz", "detokeniz"),
    ),
    (
        "waiting (IPC, queues, sleeps)",
        ("recv", "poll", "select", "wait", "sleep", "queue.py", "zmq"),
    ),
)  # fmt: skip
OTHER = "other"
IDLE = "idle (no Python frame sampled)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--adapters-registered", type=int, default=1000, help="ours")
    parser.add_argument("--max-loras", type=int, default=32, help="vLLM max_loras")
    parser.add_argument("--max-cpu-loras", type=int, default=256, help="vLLM max_cpu_loras")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="vLLM max_num_seqs")
    parser.add_argument("--sample-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument(
        "--recount",
        action="store_true",
        help="run nothing: recount the raw stacks of the run in --out with the current "
        "categories, rewrite its profile.json and profile.md",
    )
    add_workload_args(parser)
    # The per-customer load of issue 17: 16 users, 128 of 1,000 adapters, uniform.
    parser.set_defaults(
        duration=30.0,
        warmup=10.0,
        adapters_active=128,
        popularity="uniform",
        output_len=LengthDist.parse("uniform:16:64"),
    )


def check(args: argparse.Namespace) -> str | None:
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        return f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}"
    if not 1 <= args.adapters_active <= args.adapters_registered:
        return "need 1 <= --adapters-active <= --adapters-registered"
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        return "py-spy not found (it is in the dev extra)"
    return None


@dataclass
class ProcessProfile:
    """One process of the server: its samples by category (from py-spy's file `raw`)."""

    pid: int
    name: str
    raw: str
    samples: int = 0
    by_category: dict[str, int] = field(default_factory=dict)

    def read(self, folder: Path) -> None:
        """(Re)count the samples of the raw file, with the current CATEGORIES."""
        path = folder / self.raw
        counts = parse_raw(path.read_text()) if path.exists() else Counter()
        self.samples, self.by_category = sum(counts.values()), dict(counts)


@dataclass
class SystemProfile:
    name: str
    duration_s: float
    output_tokens: int
    tok_per_s: float
    errors: int
    sample_rate: int
    processes: list[ProcessProfile] = field(default_factory=list)


def categorize(stack: list[str]) -> str:
    """The category of the innermost frame (stack: outermost first) that names one."""
    for frame in reversed(stack):
        for category, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return category
    return OTHER


def parse_raw(text: str) -> Counter[str]:
    """py-spy's raw format ("frame;frame;... count" per line, outermost first) by category;
    the leading process and thread frames are skipped."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        counts[categorize(frames)] += int(count)
    return counts


def _process_name(proc: psutil.Process) -> str:
    try:
        title = " ".join(proc.cmdline())[:60]
        return title or proc.name()
    except psutil.Error:
        return "?"


def _spied(root_pid: int) -> list[tuple[int, str]]:
    """The server's processes (pid, title), named while they run."""
    root = psutil.Process(root_pid)
    return [(p.pid, _process_name(p)) for p in [root, *root.children(recursive=True)]]


def profile_tree(
    processes: list[tuple[int, str]], seconds: float, rate: int, native: bool, out: Path, label: str
) -> list[tuple[ProcessProfile, subprocess.Popen[bytes]]]:
    """Start py-spy on each process for `seconds` (not waited for)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    started = []
    for pid, name in processes:
        raw = f"{label}-{pid}.txt"
        cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
        cmd += ["--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out / raw)]
        if native:
            cmd.append("--native")
        popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((ProcessProfile(pid, name, raw), popen))
    return started


def measure(
    args: argparse.Namespace, name: str, pool: dict[str, Path], home: Path
) -> SystemProfile:
    from server.demo import demo_assets

    assets = demo_assets(args.home)
    knobs = servers.EngineKnobs(
        max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs
    )
    port = servers.free_port()
    launch = servers.ours(
        assets.base_dir, next(iter(pool.values())).parent, port, knobs, home=home / name,
        admin_key=secrets.token_hex(16), allowed_roots=[assets.adapters_dir], name=name,
    )  # fmt: skip
    names = list(pool)
    load = workload(args, names[: args.adapters_active], len(names))
    if name == "base":
        load = replace(load, adapters=(), registered=0)
    out: Path = args.out
    with servers.running(launch, port, out / "logs" / f"{name}.log") as srv:
        target = Target(srv.url, admin_key=launch.admin_key, label=name)
        if name == "ours":
            preregister(target, pool)
        asyncio.run(warm_up(target, load, args.warmup))
        time.sleep(2.0)
        spies = profile_tree(
            _spied(srv.proc.pid), args.duration, args.sample_rate, args.native, out, name
        )
        phase = asyncio.run(run_phase(target, load, "main", server_sid=srv.proc.pid))
        for _, popen in spies:
            popen.wait(timeout=args.duration + 60)
    s = summarize(phase)
    tokens = round(s.output_tok_per_s * s.duration_s)
    result = SystemProfile(
        name, s.duration_s, tokens, s.output_tok_per_s, s.errors, args.sample_rate
    )
    for process, _ in spies:
        process.read(out)
        result.processes.append(process)
    return result


def render(results: list[SystemProfile], command: str) -> str:
    lines = [f"# Profile\n\n`{command}`\n"]
    for r in results:
        lines.append(
            f"## {r.name}: {r.tok_per_s:.1f} tok/s, {r.output_tokens} output tokens in "
            f"{r.duration_s:.0f} s, {r.errors} errors\n"
        )
        for p in sorted(r.processes, key=lambda p: -p.samples):
            wall = r.duration_s * r.sample_rate  # samples of a thread busy all along
            if p.samples < 0.05 * wall:
                continue
            lines.append(f"### pid {p.pid}: {p.name}\n")
            lines.append("| category | share of wall time | ms per output token |")
            lines.append("|---|--:|--:|")
            rows = sorted(p.by_category.items(), key=lambda kv: -kv[1])
            rows.append((IDLE, max(0, round(wall) - p.samples)))
            for category, n in rows:
                ms = n / r.sample_rate * 1000 / max(r.output_tokens, 1)
                lines.append(f"| {category} | {n / wall:.1%} | {ms:.2f} |")
            lines.append("")
    return "\n".join(lines)


def recount(out: Path) -> None:
    record = json.loads((out / "profile.json").read_text())
    results = []
    for system in record["systems"]:
        processes = [ProcessProfile(**p) for p in system.pop("processes")]
        for process in processes:
            process.read(out)
        results.append(SystemProfile(**system, processes=processes))
    _write(out, record["command"], results)


def _write(out: Path, command: str, results: list[SystemProfile]) -> None:
    (out / "profile.json").write_text(
        json.dumps({"command": command, "systems": [asdict(r) for r in results]}, indent=1)
    )
    report = render(results, command)
    (out / "profile.md").write_text(report)
    print(report)


def run(args: argparse.Namespace, command: str) -> None:
    from server.demo import demo_assets

    if args.recount:
        recount(args.out)
        return

    assets = demo_assets(args.home)
    sources = [assets.adapters_dir / n for n in assets.adapter_names]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loraswap-profile-"))
    results: list[SystemProfile] = []
    try:
        pool = servers.make_adapter_pool(work / "adapters", sources, args.adapters_registered)
        for name in args.systems:
            print_progress(f"[{name}] profiling {args.duration:.0f} s of the load")
            results.append(measure(args, name, pool, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(out, command, results)


SCENARIO = Scenario(
    name="profile",
    help="Profile the whole server under a load (py-spy on every process).",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    check=check,
    out=Path("build/profile"),
)

if __name__ == "__main__":
    delegate(SCENARIO.name)
