"""Who used the CPU during a measured window: the server under test, the load generator,
and everything else on the machine.

The comparisons run on shared machines: another job's burst during one system's window
and not during another's can move wall-clock throughput more than the difference being
measured. These numbers (average cores busy over the window, from /proc) go into the
record next to each phase, so a reader can tell a quiet window from a noisy one, and
tokens per server CPU-second give a second, less contention-sensitive measure.
Linux only; elsewhere every value is absent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _box_busy_ticks() -> int | None:
    """Busy clock ticks of all CPUs since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def session_cpu_s(sid: int) -> float | None:
    """CPU seconds (user + system) used so far by the live processes of session `sid`:
    a server started with `start_new_session` and every engine process it forked."""
    total = 0
    found = False
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name (field 2) may contain spaces and parentheses: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid:  # fields[3]: session id
            total += int(fields[11]) + int(fields[12])  # utime, stime
            found = True
    return total / _CLK_TCK if found else None


@dataclass
class CpuMeter:
    """`start()` before a window, `stop()` after: average cores used over it."""

    server_sid: int | None = None
    _t0: float = 0.0
    _box0: int | None = None
    _self0: float = 0.0
    _server0: float | None = None

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._box0 = _box_busy_ticks()
        self._self0 = time.process_time()
        self._server0 = session_cpu_s(self.server_sid) if self.server_sid else None
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        box1 = _box_busy_ticks()
        out: dict[str, float] = {}
        if wall <= 0:
            return out
        out["loadgen_cores"] = (time.process_time() - self._self0) / wall
        server1 = session_cpu_s(self.server_sid) if self.server_sid else None
        if server1 is not None and self._server0 is not None:
            out["server_cores"] = (server1 - self._server0) / wall
            out["server_cpu_s"] = server1 - self._server0
        if box1 is not None and self._box0 is not None:
            out["box_cores"] = (box1 - self._box0) / _CLK_TCK / wall
            others = out["box_cores"] - out["loadgen_cores"] - out.get("server_cores", 0.0)
            out["others_cores"] = max(others, 0.0)
        return {k: round(v, 3) for k, v in out.items()}


def box_busy_cores(seconds: float = 2.0) -> float | None:
    """Average cores busy on the whole machine over the next `seconds`."""
    before = _box_busy_ticks()
    time.sleep(seconds)
    after = _box_busy_ticks()
    if before is None or after is None:
        return None
    return (after - before) / _CLK_TCK / seconds
