"""What a load run sends: which adapter, how long a prompt, how many tokens, and when.

Everything random here draws from a `random.Random` the caller seeds, so a run (and the
unit tests) can be repeated exactly; nothing does I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

PopularityKind = Literal["uniform", "zipf", "single"]


@dataclass(frozen=True)
class Popularity:
    """How requests spread over the active adapters.

    `zipf`: the adapter of rank k (1-based, in the order given) gets weight 1 / k**alpha,
    the usual model of "a few tenants make most of the traffic". `single`: every request
    goes to the first adapter. `uniform`: all equally.
    """

    kind: PopularityKind = "zipf"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zipf", "single"):
            raise ValueError(f"unknown popularity {self.kind!r}")
        if self.kind == "zipf" and not self.alpha > 0:
            raise ValueError("the Zipf alpha must be > 0")

    def weights(self, n: int) -> list[float]:
        """Normalised probabilities of ranks 1..n."""
        if n < 1:
            raise ValueError("need at least one adapter")
        if self.kind == "single":
            raw = [1.0] + [0.0] * (n - 1)
        elif self.kind == "uniform":
            raw = [1.0] * n
        else:
            raw = [1.0 / (k**self.alpha) for k in range(1, n + 1)]
        total = sum(raw)
        return [w / total for w in raw]

    def describe(self) -> str:
        return f"zipf(alpha={self.alpha:g})" if self.kind == "zipf" else self.kind


class ModelSampler:
    """Picks the model of each request: an active adapter by popularity, or the base.

    `base_fraction` of the requests go to the base model (None from `sample`); with no
    adapters at all every request does (the "base model alone" baseline).
    """

    def __init__(
        self,
        adapters: Sequence[str],
        popularity: Popularity,
        rng: random.Random,
        base_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= base_fraction <= 1.0:
            raise ValueError("base_fraction must be within [0, 1]")
        self.adapters = list(adapters)
        self.base_fraction = 1.0 if not self.adapters else base_fraction
        self._rng = rng
        self._weights = popularity.weights(len(self.adapters)) if self.adapters else []
        # Cumulative weights once: random.choices would redo the sum on every call.
        self._cum = [sum(self._weights[: i + 1]) for i in range(len(self._weights))]

    @property
    def weights(self) -> list[float]:
        return list(self._weights)

    def sample(self) -> str | None:
        if self.base_fraction >= 1.0 or (
            self.base_fraction > 0.0 and self._rng.random() < self.base_fraction
        ):
            return None
        return self._rng.choices(self.adapters, cum_weights=self._cum)[0]


# -- lengths ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths, written as a short spec:

    `64` (always 64), `uniform:16:128` (inclusive), `normal:64:16` (mean, sd),
    `lognormal:64:0.5` (median, sigma: a long right tail, like real prompts).
    Every draw is clipped to [lo, hi] (`lo` at least 1).
    """

    kind: Literal["fixed", "uniform", "normal", "lognormal"]
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 20

    @classmethod
    def parse(cls, spec: str, *, hi: int = 1 << 20) -> LengthDist:
        parts = spec.strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", float(int(parts[0])), hi=hi)
            kind, a, b = parts[0], float(parts[1]), float(parts[2])
        except (ValueError, IndexError):
            raise ValueError(
                f"bad length spec {spec!r}: try 64, uniform:16:128, normal:64:16"
            ) from None
        if kind not in ("uniform", "normal", "lognormal") or len(parts) != 3:
            raise ValueError(f"bad length spec {spec!r}: try 64, uniform:16:128, normal:64:16")
        if kind == "uniform" and a > b:
            raise ValueError(f"bad length spec {spec!r}: uniform needs low <= high")
        return cls(kind, a, b, hi=hi)  # type: ignore[arg-type]

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        else:
            value = rng.lognormvariate(math.log(self.a), self.b)
        return max(self.lo, min(self.hi, round(value)))

    def __str__(self) -> str:  # argparse shows defaults with it
        return self.describe()

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


# Short, common English words: with a leading space nearly every one is a single token
# in BPE vocabularies (SmolLM2's included), so a prompt of n words is about n tokens
# without the load generator needing the model's tokenizer. The server's usage numbers
# give the exact counts in the record.
_WORD_TEXT = (
    "the sea ship wind sail port rope deck map gold island storm wave star night day "
    "captain crew anchor coast harbor light house bird fish rock sand tide moon sun cloud "
    "rain boat oar net cargo trade king city road river hill tree stone fire water bread "
    "salt iron wood cloth letter book song story old new small large quick slow bright dark"
)
_WORDS = tuple(_WORD_TEXT.split())

_TOPICS = (
    "Tell me about",
    "Write a short note about",
    "Explain in simple words",
    "Describe",
    "Give me advice about",
    "What do you know about",
)


def make_prompt(words: int, rng: random.Random) -> str:
    """A user message of about `words` tokens: an instruction, then filler words."""
    head = rng.choice(_TOPICS)
    filler = max(words - len(head.split()), 0)
    return " ".join([head, *(rng.choice(_WORDS) for _ in range(filler))]) + "."


# -- arrivals --------------------------------------------------------------------------


def poisson_gaps(rate: float, rng: random.Random) -> Iterator[float]:
    """Inter-arrival times of a Poisson process of `rate` arrivals per second: i.i.d.
    exponential gaps, the memoryless arrivals of many independent users (open loop)."""
    if not rate > 0:
        raise ValueError("the arrival rate must be > 0")
    while True:
        yield rng.expovariate(rate)


def arrival_times(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """The arrival offsets in [0, duration_s) of one Poisson run."""
    times: list[float] = []
    t = 0.0
    for gap in poisson_gaps(rate, rng):
        t += gap
        if t >= duration_s:
            return times
        times.append(t)
    raise AssertionError("unreachable")  # poisson_gaps never ends


# -- hot swaps -------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapEvent:
    """At `at_s` seconds into the measured phase, change what adapter `adapter` serves:
    register a new version from `source` (a path the server may read) and make it
    current, or make an existing `version` current (a rollback). Needs an admin key."""

    at_s: float
    adapter: str
    source: str | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.version is None):
            raise ValueError("a swap sets exactly one of source and version")

    @classmethod
    def parse(cls, spec: str) -> SwapEvent:
        """`20:a000=/path/to/adapter` (new version) or `40:a000@1` (set version 1)."""
        at, sep, rest = spec.partition(":")
        try:
            at_s = float(at)
            if not sep:
                raise ValueError
            if "=" in rest:
                name, _, source = rest.partition("=")
                return cls(at_s, name, source=source)
            name, _, version = rest.partition("@")
            return cls(at_s, name, version=int(version))
        except ValueError:
            raise ValueError(
                f"bad swap {spec!r}: use SECONDS:ADAPTER=SOURCE or SECONDS:ADAPTER@VERSION"
            ) from None

    def describe(self) -> str:
        what = f"={self.source}" if self.source is not None else f"@{self.version}"
        return f"{self.at_s:g}s {self.adapter}{what}"


def alternating_swaps(
    adapter: str, sources: Sequence[str], every_s: float, duration_s: float
) -> list[SwapEvent]:
    """A swap every `every_s` seconds on one adapter: first new versions from each of
    `sources` in turn (versions 2, 3, ...), then rollbacks cycling through the versions,
    so that every swap changes the weights served."""
    if not every_s > 0:
        raise ValueError("the swap interval must be > 0")
    if not sources:
        raise ValueError("alternating swaps need at least one source")
    events: list[SwapEvent] = []
    t = every_s
    versions = 1  # version 1 is the adapter's folder, registered before the run
    while t < duration_s:
        i = len(events)
        if i < len(sources):
            events.append(SwapEvent(t, adapter, source=sources[i]))
            versions += 1
        else:
            # Cycle 1, 2, ..., versions: the last added is current, so 1 comes first and
            # each step names a version other than the current one.
            events.append(SwapEvent(t, adapter, version=(i - len(sources)) % versions + 1))
        t += every_s
    return events
