"""The workload flags shared by the `run` and `compare` scenarios (the flags every
scenario shares are in loadtests/cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace

from loadtests.runner import Workload
from loadtests.workload import LengthDist, Popularity, SwapEvent


def counts(value: str) -> list[int]:
    """A comma list of adapter counts, in the order given."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {value!r}") from None
    if any(c < 1 for c in values):
        raise argparse.ArgumentTypeError("adapter counts must be >= 1")
    return values


@dataclass(frozen=True)
class SweepPoint:
    """One sweep point: the load again over `count` active adapters, spread as
    `popularity` says (None: as the main phase's)."""

    count: int
    popularity: Popularity | None = None

    @property
    def label(self) -> str:
        """The phase name: `active=8`, or `active=128,uniform`."""
        kind = "" if self.popularity is None else f",{self.popularity.kind}"
        return f"active={self.count}{kind}"

    def of(self, load: Workload, names: Sequence[str] | None = None) -> Workload:
        """`load` at this point: over the first `count` of `names` (default: of its own
        adapters), with this point's popularity, without hot swaps (a sweep point
        measures adapters alone)."""
        adapters = tuple(names[: self.count]) if names is not None else load.adapters[: self.count]
        popularity = self.popularity or load.popularity
        return replace(load, adapters=adapters, popularity=popularity, swaps=())


def sweep_points(value: str) -> list[SweepPoint]:
    """A comma list of `N` or `N:uniform|zipf|single`, in the order given."""
    points: list[SweepPoint] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        count, _, kind = item.partition(":")
        try:
            popularity = Popularity(kind) if kind else None  # type: ignore[arg-type]
            points.append(SweepPoint(counts(count)[0], popularity))
        except (ValueError, IndexError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected points like 1,8,128:uniform, got {item!r}"
            ) from None
    return points


def ascending_counts(value: str) -> list[int]:
    """A comma list of counts, sorted, each once; at least one."""
    out = sorted(set(counts(value)))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one count")
    return out


def _length(value: str) -> LengthDist:
    try:
        return LengthDist.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _swap(value: str) -> SwapEvent:
    try:
        return SwapEvent.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload group (the help shows each default: loadtests.cli.HelpFormatter)."""
    g = parser.add_argument_group("workload")
    _add_load(g)
    _add_requests(g)
    _add_sweep(g)
    g.add_argument("--seed", type=int, default=0, help="random seed: same seed, same requests")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds")


def _add_load(g: argparse._ArgumentGroup) -> None:
    """How hard and how long: the loop, its size, the measured window."""
    g.add_argument(
        "--mode",
        choices=["closed", "open"],
        default="closed",
        help="closed: N users back to back; open: Poisson arrivals",
    )
    g.add_argument("--concurrency", type=int, default=16, help="closed loop: users")
    g.add_argument("--rate", type=float, default=4.0, help="open loop: requests/s")
    g.add_argument(
        "--max-outstanding",
        type=int,
        default=1024,
        help="open loop: arrivals past this many running are dropped, and counted",
    )
    g.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    g.add_argument(
        "--warmup", type=float, default=10.0, help="unrecorded seconds of the same load first"
    )


def _add_requests(g: argparse._ArgumentGroup) -> None:
    """What the requests are: which adapters, how popular, how long."""
    g.add_argument(
        "--adapters-active", type=int, default=8, help="distinct adapters requests go to"
    )
    g.add_argument(
        "--popularity",
        choices=["zipf", "uniform", "single"],
        default="zipf",
        help="how requests spread over the active adapters",
    )
    g.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf exponent")
    g.add_argument(
        "--base-fraction", type=float, default=0.0, help="share of requests to the base model"
    )
    g.add_argument(
        "--prompt-len",
        type=_length,
        default=LengthDist.parse("uniform:16:64"),
        help="prompt words (~tokens): 64, uniform:A:B, normal:MEAN:SD, lognormal:MEDIAN:SIGMA",
    )
    g.add_argument(
        "--output-len",
        type=_length,
        default=LengthDist.parse("uniform:32:96"),
        help="max_tokens per request, same forms",
    )


def _add_sweep(g: argparse._ArgumentGroup) -> None:
    """Sweep points: the same load again over other numbers of active adapters."""
    g.add_argument(
        "--sweep",
        type=sweep_points,
        default=[],
        help="also measure with these numbers of active adapters, each spread as the main "
        "phase or as given: e.g. 1,8,128:uniform",
    )
    g.add_argument(
        "--sweep-duration", type=float, default=15.0, help="measured seconds of each sweep point"
    )
    g.add_argument(
        "--sweep-warmup",
        type=float,
        default=10.0,
        # Unwarmed, a sweep point read 0.58x to 0.86x where the same load as a warmed
        # main phase read 1.01x (issue 17): the engine's caches and batch shapes follow
        # the load, so each point is warmed with its own.
        help="unrecorded seconds of each sweep point's own load before it",
    )


def add_swap_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swap",
        type=_swap,
        action="append",
        default=[],
        help="hot swap during the measured phase: SECONDS:ADAPTER=SOURCE (new "
        "version from SOURCE) or SECONDS:ADAPTER@VERSION; repeat",
    )


def workload(
    args: argparse.Namespace,
    adapters: Sequence[str],
    registered: int,
    swaps: Sequence[SwapEvent] = (),
) -> Workload:
    return Workload(
        mode=args.mode,
        concurrency=args.concurrency,
        rate=args.rate,
        duration_s=args.duration,
        adapters=tuple(adapters),
        registered=registered,
        popularity=Popularity(args.popularity, args.zipf_alpha),
        base_fraction=args.base_fraction,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        seed=args.seed,
        swaps=tuple(swaps),
        max_outstanding=args.max_outstanding,
        request_timeout_s=args.request_timeout,
    )
