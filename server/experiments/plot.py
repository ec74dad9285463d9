"""A PNG of an experiment: each metric's running mean with its 95% interval, per arm.

The running mean of an arm at time t is the mean of the outcomes of its exposures up to
t (exposure time, as the report's window), with the interval the report gives for that
many outcomes: the report's own `binary_summary` / `score_summary` of each prefix, so the
last point of each line is the report's figure for the same window, and no statistic is
computed twice. Prefixes are sampled (`MAX_POINTS` per arm, the last one always).

matplotlib renders headless (Agg canvas, no pyplot and its global state), is imported
on the first plot (the server starts without it), and is called from a worker thread
(the route runs `render` in `asyncio.to_thread`), one plot at a time: matplotlib is not
meant to draw several figures from several threads at once.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np

from adapters_registry.experiments import Exposure, Feedback
from adapters_registry.records import Variant
from server.experiments.report import CONFIDENCE, binary_summary, score_summary

Kind = Literal["label", "score"]
_KINDS: tuple[Kind, ...] = ("label", "score")
MAX_POINTS = 200
# Metrics drawn in one image at most (each up to two charts): metric names come from
# callers, and one chart per name would let them make the image as large as they like.
MAX_METRICS = 6
_DRAWING = threading.Lock()


@dataclass(frozen=True)
class Running:
    """One arm's running mean of one (metric, kind): a point per sampled prefix."""

    variant: str
    times: list[float]  # Unix seconds of the prefix's last exposure
    counts: list[int]
    means: list[float]
    lows: list[float | None]  # None: no interval yet (fewer than 2 scores, no spread)
    highs: list[float | None]


def _prefixes(n: int, max_points: int) -> list[int]:
    """Prefix lengths to draw: at most `max_points`, evenly spread, always n itself."""
    if n <= max_points:
        return list(range(1, n + 1))
    return sorted({int(k) for k in np.linspace(1, n, max_points).round()} | {n})


def _summary(kind: Kind, values: Sequence[float]) -> dict[str, Any]:
    return binary_summary([int(v) for v in values]) if kind == "label" else score_summary(values)


def running_means(
    variants: Sequence[Variant],
    exposures: Sequence[Exposure],
    feedback: Sequence[tuple[str, Feedback]],
    metric: str,
    kind: Kind,
    *,
    max_points: int = MAX_POINTS,
) -> list[Running]:
    """Per arm (configured arms first, in order, then any other with outcomes)."""
    when = {e.exposure_id: e.created_at for e in exposures}
    outcomes: dict[str, list[tuple[float, float]]] = {}
    for variant, f in feedback:
        value = f.label if kind == "label" else f.score
        if f.metric == metric and value is not None:
            at = when.get(f.exposure_id, f.created_at)
            outcomes.setdefault(variant, []).append((at, float(value)))
    order = [v.key for v in variants]
    order += sorted(set(outcomes) - set(order))
    out = []
    # As in the report: degenerate prefixes (one score, all equal) warn on their way to
    # an undefined interval, which is drawn as none.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for key in order:
            points = sorted(outcomes.get(key, []))
            if not points:
                continue
            values = [v for _, v in points]
            line = Running(key, [], [], [], [], [])
            for k in _prefixes(len(points), max_points):
                s = _summary(kind, values[:k])
                line.times.append(points[k - 1][0])
                line.counts.append(k)
                line.means.append(float(s["mean"]))
                ci = s["ci95"]
                line.lows.append(None if ci is None else ci[0])
                line.highs.append(None if ci is None else ci[1])
            out.append(line)
    return out


def panels(
    variants: Sequence[Variant],
    exposures: Sequence[Exposure],
    feedback: Sequence[tuple[str, Feedback]],
    metrics: Sequence[str],
) -> dict[tuple[str, Kind], list[Running]]:
    """The running means of each (metric, kind) that has outcomes, in `metrics` order."""
    out: dict[tuple[str, Kind], list[Running]] = {}
    for metric in metrics:
        for kind in _KINDS:
            lines = running_means(variants, exposures, feedback, metric, kind)
            if lines:
                out[(metric, kind)] = lines
    return out


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def render(
    alias: str, drawn: dict[tuple[str, Kind], list[Running]], window: str, note: str = ""
) -> bytes:
    """The PNG: one chart per (metric, kind), a line and a shaded interval per arm; with
    nothing to draw, an image that says so (an embedded plot never breaks). `note`: a
    line under the title."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    with _DRAWING:
        rows = max(len(drawn), 1)
        fig = Figure(figsize=(9, 3.2 * rows + 0.6), dpi=100, layout="constrained")
        title = f"alias {alias}: running mean, {100 * CONFIDENCE:g}% interval ({window})"
        fig.suptitle(title + (f"\n{note}" if note else ""))
        axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
        if not drawn:
            axes[0].set_axis_off()
            axes[0].text(
                0.5, 0.5, "no feedback in this window yet", ha="center", va="center", fontsize=14
            )
        for ax, ((metric, kind), lines) in zip(axes, drawn.items(), strict=False):
            for line in lines:
                times = [_when(t) for t in line.times]
                label = f"{line.variant}: {line.means[-1]:.3g} (n={line.counts[-1]})"
                (drawn_line,) = ax.plot(times, line.means, label=label, drawstyle="steps-post")
                low = np.array([np.nan if v is None else v for v in line.lows], dtype=float)
                high = np.array([np.nan if v is None else v for v in line.highs], dtype=float)
                ax.fill_between(
                    times,
                    low,
                    high,
                    step="post",
                    alpha=0.2,
                    color=drawn_line.get_color(),
                    linewidth=0,
                )
            locator = AutoDateLocator()  # type: ignore[no-untyped-call]
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
            ax.set_title(f"{metric}: " + ("share positive" if kind == "label" else "mean score"))
            ax.set_ylabel("positive share" if kind == "label" else "score")
            ax.set_xlabel("exposure time (UTC)")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()
