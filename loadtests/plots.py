"""PNG plots of a run record (matplotlib, headless).

- `throughput_vs_adapters.png`: output tokens/s and requests/s against the number of
  distinct active adapters, one line per system (every phase of the record is a point);
- `latency_cdf.png`: CDFs of end-to-end latency and of TTFT in each system's main phase;
- `ttft_over_time.png`: TTFT of every request against when it was sent, per system, with
  the hot swaps marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.record import (
    NOISY_OTHERS_CORES,
    PhaseRecord,
    RunRecord,
    SystemRecord,
    first_token_times,
    summarize,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAIN_PHASE = "main"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _measured(system: SystemRecord) -> list[PhaseRecord]:
    return [p for p in system.phases if p.name != "warm-up"]


def _main(system: SystemRecord) -> PhaseRecord | None:
    return system.phase(MAIN_PHASE) or next(iter(_measured(system)), None)


def plot_throughput(record: RunRecord, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in record.systems:
        points = sorted(
            (
                (p.active_adapters, summarize(p), p.name == MAIN_PHASE, p.noisy)
                for p in _measured(system)
            ),
            key=lambda point: point[0],
        )
        if not points:
            continue
        xs = [x for x, *_ in points]
        toks = [s.output_tok_per_s for _, s, *_ in points]
        line = ax_tok.plot(xs, toks, "o-", label=system.label)
        ax_req.plot(xs, [s.req_per_s for _, s, *_ in points], "o-", color=line[0].get_color())
        # The main phase (longest window) stands out: the sweep points are shorter runs.
        for x, s, main, noisy in points:
            if main:
                ax_tok.plot([x], [s.output_tok_per_s], "s", ms=10, mfc="none", color="k")
                ax_req.plot([x], [s.req_per_s], "s", ms=10, mfc="none", color="k")
            if noisy:
                ax_tok.plot([x], [s.output_tok_per_s], "x", ms=12, color="r")
                ax_req.plot([x], [s.req_per_s], "x", ms=12, color="r")
    ax_tok.set(xlabel="distinct active adapters", ylabel="output tokens / s", title="Throughput")
    ax_req.set(xlabel="distinct active adapters", ylabel="completed requests / s")
    ax_req.set_title(f"Requests (□ main phase, red × others used > {NOISY_OTHERS_CORES:g} cores)")
    for ax in (ax_tok, ax_req):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_tok.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(ax: Axes, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    n = len(ordered)
    # From 0 at the first value, so that even one request draws a visible step.
    ax.plot(
        [ordered[0], *ordered],
        [0.0] + [(i + 1) / n for i in range(n)],
        drawstyle="steps-post",
        marker="." if n < 30 else None,
        label=f"{label} (n={n})",
    )


def plot_latency_cdfs(record: RunRecord, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, (ax_lat, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in record.systems:
        phase = _main(system)
        if phase is None:
            continue
        ok = [r for r in phase.requests if r.status == "ok"]
        _cdf(ax_lat, [r.latency_s for r in ok if r.latency_s is not None], system.label)
        _cdf(ax_ttft, first_token_times(phase), system.label)
    ax_lat.set(xlabel="end-to-end latency (s)", ylabel="fraction of requests")
    ax_lat.set_title("Latency (completed requests)")
    ax_ttft.set(xlabel="time to first token (s)", title="TTFT (every request with a token)")
    for ax in (ax_lat, ax_ttft):
        # Log x: the naive baseline is orders of magnitude slower than the others.
        if ax.has_data():
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_over_time(record: RunRecord, path: Path) -> Path:
    plt = _pyplot()
    systems = [(s, p) for s in record.systems if (p := _main(s)) is not None]
    rows = max(len(systems), 1)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.3 * rows + 0.6), squeeze=False)
    for ax, (system, phase) in zip(axes[:, 0], systems, strict=False):
        ok = [r for r in phase.requests if r.status == "ok" and r.ttft_s is not None]
        ax.scatter([r.start_s for r in ok], [r.ttft_s for r in ok], s=8, alpha=0.7)
        # Cut off at the window's end after their first token: hollow.
        cut = [r for r in phase.requests if r.status == "cancelled" and r.ttft_s is not None]
        ax.scatter(
            [r.start_s for r in cut],
            [r.ttft_s for r in cut],
            s=10,
            facecolors="none",
            edgecolors="C0",
            alpha=0.7,
        )
        failed = [r for r in phase.requests if r.status == "error"]
        if failed:
            ax.scatter([r.start_s for r in failed], [0] * len(failed), s=12, marker="x", c="r")
        for i, swap in enumerate(phase.swaps):
            at = swap.started_s if swap.started_s is not None else swap.at_s
            ax.axvline(
                at,
                color="r" if swap.error else "k",
                ls="--",
                lw=1,
                label="hot swap" if i == 0 else None,
            )
        if phase.swaps:
            ax.legend(fontsize=8, loc="upper right")
        ax.set_title(f"{system.label}: {phase.describe()}", fontsize=8, loc="left")
        ax.set_ylabel("TTFT (s)")
        ax.set_xlim(0, phase.duration_s)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("request sent at (s into the measured window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(record: RunRecord, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_throughput(record, out / "throughput_vs_adapters.png"),
        plot_latency_cdfs(record, out / "latency_cdf.png"),
        plot_ttft_over_time(record, out / "ttft_over_time.png"),
    ]
