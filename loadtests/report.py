"""The markdown results table of a run record, and `python -m loadtests report` to
rebuild `results.md` and the plots from a `results.json` (of `run` or `compare`).

    python -m loadtests report build/compare/results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtests.cli import Scenario, delegate
from loadtests.plots import MAIN_PHASE, write_plots
from loadtests.record import (
    NOISY_OTHERS_CORES,
    PhaseRecord,
    RunRecord,
    Summary,
    SystemRecord,
    summarize,
)

BASE_SYSTEM = "base"
VLLM_SYSTEM = "vllm"
NO_LORA_SYSTEM = "vllm-base"


def _s(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _ratio(value: float, reference: Summary | None) -> str:
    if reference is None or not reference.output_tok_per_s:
        return "–"
    return f"{value / reference.output_tok_per_s:.2f}×"


def _main(system: SystemRecord) -> PhaseRecord | None:
    return system.phase(MAIN_PHASE)


def _main_summary(record: RunRecord, name: str) -> Summary | None:
    system = next((s for s in record.systems if s.name == name), None)
    phase = _main(system) if system is not None else None
    return summarize(phase) if phase is not None else None


def results_table(record: RunRecord) -> str:
    base = _main_summary(record, BASE_SYSTEM)
    vllm = _main_summary(record, VLLM_SYSTEM)
    lines = [
        "| system | load | ok / err / cut | req/s | output tok/s | p50 latency (s) "
        "| p99 latency (s) | p50 TTFT (s) | p99 TTFT (s) | tok/s vs base alone "
        "| tok/s vs plain vLLM | server cores | others' cores | tok per server CPU-s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for system in record.systems:
        phase = _main(system)
        if phase is None:
            why = system.error or "no measured phase"
            lines.append(f"| {system.label} | not measured: {why} |" + " |" * 12)
            continue
        s = summarize(phase)
        noisy = " **(noisy)**" if phase.noisy else ""
        load = f"{phase.concurrency} users" if phase.mode == "closed" else f"{phase.rate:g} req/s"
        load += f", {phase.active_adapters} adapters" if phase.active_adapters else ", base"
        lines.append(
            f"| {system.label} | {load}, {phase.duration_s:g} s | {s.ok} / {s.errors} / "
            f"{s.cancelled} | {s.req_per_s:.2f} | {s.output_tok_per_s:.1f} "
            f"| {_s(s.latency_p50_s)} | {_s(s.latency_p99_s)} | {_s(s.ttft_p50_s)} "
            f"| {_s(s.ttft_p99_s)} | {_ratio(s.output_tok_per_s, base)} "
            f"| {_ratio(s.output_tok_per_s, vllm)} | {_s(s.server_cores)} "
            f"| {_s(s.others_cores)}{noisy} | {_s(s.tok_per_server_cpu_s, digits=1)} |"
        )
    no_lora = _main_summary(record, NO_LORA_SYSTEM)
    if base is not None and no_lora is not None:
        lines.append(
            "\nBase-only traffic, our LoRA-enabled server (d) against an engine without "
            f"LoRA (e): {_ratio(base.output_tok_per_s, no_lora)} output tok/s."
        )
    return "\n".join(lines)


def sweep_table(record: RunRecord) -> str | None:
    """Output tok/s by number of active adapters, over every measured phase."""
    counts = sorted(
        {p.active_adapters for s in record.systems for p in s.phases if p.name != "warm-up"}
    )
    if len(counts) < 2:
        return None
    lines = [
        "| system | " + " | ".join(f"{n} active" for n in counts) + " |",
        "|---|" + "--:|" * len(counts),
    ]
    for system in record.systems:
        cells = []
        for n in counts:
            phases = [p for p in system.phases if p.active_adapters == n and p.name != "warm-up"]
            cells.append(
                " / ".join(
                    f"{summarize(p).output_tok_per_s:.1f}{' (noisy)' if p.noisy else ''}"
                    for p in phases
                )
                or "–"
            )
        lines.append(f"| {system.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def swaps_table(record: RunRecord) -> str | None:
    rows = []
    for system in record.systems:
        for phase in system.phases:
            for w in phase.swaps:
                took = (
                    f"{(w.ended_s - w.started_s) * 1000:.0f} ms"
                    if w.started_s is not None and w.ended_s is not None
                    else "–"
                )
                result = w.error or f"version {w.version} current"
                rows.append(
                    f"| {system.label} | {phase.name} | {_s(w.started_s, digits=1)} s "
                    f"| {w.adapter} | {w.action} | {took} | {result} |"
                )
    if not rows:
        return None
    head = [
        "| system | phase | at | adapter | action | admin call took | result |",
        "|---|---|--:|---|---|--:|---|",
    ]
    return "\n".join(head + rows)


def render(record: RunRecord, plots: list[Path] | None = None) -> str:
    parts = ["# Load test results", "", f"Run {record.created}.", "", f"    {record.command}", ""]
    if record.host:
        parts += ["Host: " + ", ".join(f"{k} {v}" for k, v in record.host.items()), ""]
    parts += ["## Main phase", "", results_table(record), "", _READING, "", "Workloads:", ""]
    for system in record.systems:
        for phase in system.phases:
            if phase.name != "warm-up":
                parts.append(f"- {system.label}, `{phase.name}`: {phase.describe()}")
    parts.append("")
    sweep = sweep_table(record)
    if sweep:
        parts += [
            "## Output tok/s by number of active adapters",
            "",
            sweep,
            "",
            f"(noisy: the rest of the machine used more than {NOISY_OTHERS_CORES:g} cores "
            "on average during that window)",
            "",
        ]
    swaps = swaps_table(record)
    if swaps:
        parts += ["## Hot swaps", "", swaps, ""]
    parts += _notes(record)
    for path in plots or ():
        parts += [f"![{path.stem}]({path.name})", ""]
    return "\n".join(parts)


# How to read the main table's numbers.
_READING = (
    "Throughputs are over the measured window: every output token delivered in it "
    "(requests still running at its end count the tokens they had streamed, then are "
    "cut) per second; req/s counts requests completed in it. Latency percentiles are "
    "over completed requests, TTFT percentiles over every request whose first token "
    "came in the window. Ratios compare output tok/s. "
    "Cores: average CPU cores used over the window by the server's processes and by "
    "everything else on the machine except the load generator (a busy neighbour makes "
    "a window slower); tokens per server CPU-second is the less contention-sensitive "
    "measure of the two."
)


def _notes(record: RunRecord) -> list[str]:
    """The systems' notes and each phase's first error, if any."""
    errors = [
        (system.label, s.first_error)
        for system in record.systems
        for phase in system.phases
        if (s := summarize(phase)).first_error
    ]
    notes = [(system.label, note) for system in record.systems for note in system.notes]
    if not (notes or errors):
        return []
    return [
        "## Notes",
        "",
        *(f"- {label}: {note}" for label, note in notes),
        *(f"- {label}: first error: `{error}`" for label, error in errors),
        "",
    ]


def write_report(record: RunRecord, out: Path, *, plots: bool = True) -> Path:
    """`results.md` (and the PNGs beside it) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    if plots:
        try:
            images = write_plots(record, out)
        except ImportError as exc:  # a broken matplotlib install: the table still matters
            print(f"no plots ({exc}); pip install matplotlib", file=sys.stderr)
    path = out / "results.md"
    path.write_text(render(record, images))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("record", type=Path, help="a results.json")


def run(args: argparse.Namespace, command: str) -> None:
    record = RunRecord.read(args.record)
    print(write_report(record, args.out or args.record.parent))


SCENARIO = Scenario(
    name="report",
    help="Rebuild results.md and the plots from a run's results.json.",
    doc=__doc__,
    add_arguments=add_arguments,
    run=run,
    out=None,
    home=False,
)


if __name__ == "__main__":  # the older form: python -m loadtests.report
    delegate(SCENARIO.name)
