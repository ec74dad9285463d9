"""loadtests/: samplers, arrivals, the load loops against in-process fake servers, and
the report and plots from a synthetic record. Fast: no vLLM, no model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import httpx
import pytest

from loadtests import servers
from loadtests.cpu import CpuMeter, session_cpu_s
from loadtests.options import SweepPoint, sweep_points
from loadtests.record import (
    PhaseRecord,
    RequestRecord,
    RunRecord,
    SwapRecord,
    SystemRecord,
    percentile,
    summarize,
)
from loadtests.report import render, write_report
from loadtests.runner import Target, Workload, run_phase, warm_up
from loadtests.servers import adapter_names, make_adapter_pool
from loadtests.workload import (
    LengthDist,
    ModelSampler,
    Popularity,
    SwapEvent,
    alternating_swaps,
    arrival_times,
    make_prompt,
    poisson_gaps,
)
from server.app import create_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine

URL = "http://fake"
ADAPTERS = ("a0", "a1", "a2", "a3")


# -- samplers --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.5])
def test_zipf_sampler_follows_the_power_law(alpha: float) -> None:
    n, draws = 6, 60_000
    sampler = ModelSampler(adapter_names(n), Popularity("zipf", alpha), random.Random(1))
    counts = Counter(sampler.sample() for _ in range(draws))
    harmonic = sum(1 / k**alpha for k in range(1, n + 1))
    for rank, name in enumerate(adapter_names(n), start=1):
        expected = draws / (rank**alpha * harmonic)
        # 5 standard deviations of a binomial count: fails only on a wrong distribution.
        sd = (expected * (1 - expected / draws)) ** 0.5
        assert abs(counts[name] - expected) < 5 * sd, (rank, counts[name], expected)
    # The defining ratio: rank 1 over rank 2 is 2**alpha.
    assert counts["a000"] / counts["a001"] == pytest.approx(2**alpha, rel=0.06)


def test_uniform_single_and_base_fraction() -> None:
    uniform = ModelSampler(ADAPTERS, Popularity("uniform"), random.Random(2))
    counts = Counter(uniform.sample() for _ in range(40_000))
    assert set(counts) == set(ADAPTERS)
    assert max(counts.values()) / min(counts.values()) < 1.1

    single = ModelSampler(ADAPTERS, Popularity("single"), random.Random(3))
    assert {single.sample() for _ in range(1000)} == {"a0"}

    mixed = ModelSampler(ADAPTERS, Popularity("uniform"), random.Random(4), base_fraction=0.25)
    picks = [mixed.sample() for _ in range(40_000)]
    assert picks.count(None) / len(picks) == pytest.approx(0.25, abs=0.015)

    base_only = ModelSampler([], Popularity("zipf"), random.Random(5))
    assert {base_only.sample() for _ in range(100)} == {None}
    with pytest.raises(ValueError, match="alpha"):
        Popularity("zipf", 0.0)


def test_poisson_arrivals_have_the_set_mean_rate_and_exponential_gaps() -> None:
    rate, duration = 40.0, 500.0
    times = arrival_times(rate, duration, random.Random(7))
    expected = rate * duration  # Poisson: variance = mean
    assert abs(len(times) - expected) < 4 * expected**0.5
    assert times == sorted(times)
    assert times[0] >= 0 and times[-1] < duration
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps have a coefficient of variation of 1; evenly spaced arrivals at
    # the same mean rate would have 0: this tells Poisson apart from a metronome.
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    gen = poisson_gaps(2.0, random.Random(8))
    assert statistics.fmean(next(gen) for _ in range(20_000)) == pytest.approx(0.5, rel=0.03)
    with pytest.raises(ValueError, match="rate"):
        arrival_times(0.0, 1.0, random.Random(0))


def test_length_distributions() -> None:
    rng = random.Random(9)
    assert {LengthDist.parse("64").sample(rng) for _ in range(10)} == {64}
    uniform = [LengthDist.parse("uniform:16:20").sample(rng) for _ in range(2000)]
    assert set(uniform) == {16, 17, 18, 19, 20}
    normal = [LengthDist.parse("normal:100:10").sample(rng) for _ in range(5000)]
    assert statistics.fmean(normal) == pytest.approx(100, abs=1)
    assert statistics.stdev(normal) == pytest.approx(10, rel=0.1)
    lognormal = [LengthDist.parse("lognormal:50:0.5").sample(rng) for _ in range(5000)]
    assert statistics.median(lognormal) == pytest.approx(50, abs=2)
    assert min(LengthDist.parse("normal:1:50").sample(rng) for _ in range(500)) >= 1
    assert LengthDist.parse("uniform:16:128").describe() == "uniform:16:128"
    for bad in ("", "x", "uniform:9", "uniform:9:1", "poisson:3:4"):
        with pytest.raises(ValueError, match="bad length spec"):
            LengthDist.parse(bad)


def test_prompts_have_about_the_asked_number_of_words() -> None:
    rng = random.Random(10)
    for words in (5, 40, 200):
        assert len(make_prompt(words, rng).split()) == words


def test_swap_specs_and_alternating_schedule() -> None:
    assert SwapEvent.parse("20:a000=/srv/x") == SwapEvent(20.0, "a000", source="/srv/x")
    assert SwapEvent.parse("7.5:a000@2") == SwapEvent(7.5, "a000", version=2)
    for bad in ("a000@2", "x:a000@2", "3:a000@v"):
        with pytest.raises(ValueError, match="bad swap"):
            SwapEvent.parse(bad)
    events = alternating_swaps("a000", ["/f", "/s"], every_s=10, duration_s=55)
    assert [(e.at_s, e.source, e.version) for e in events] == [
        (10, "/f", None),
        (20, "/s", None),
        (30, None, 1),
        (40, None, 2),
        (50, None, 3),
    ]


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


# -- the load loops, against a fake OpenAI server ----------------------------------------


class _Body(httpx.AsyncByteStream):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            yield event

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]


class FakeOpenAI:
    """Streams `max_tokens` one-token chunks, `token_delay_s` apart, then usage and
    [DONE]; counts requests in flight (from the request until its stream ends or is
    closed) and remembers every body."""

    def __init__(self, token_delay_s: float = 0.002, missing: frozenset[str] = frozenset()):
        self.token_delay_s = token_delay_s
        self.missing = missing
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] in self.missing:
            error = {"message": "no such model", "type": "not_found_error", "code": None}
            return httpx.Response(404, json={"error": error})
        if not body.get("stream"):
            message = {"role": "assistant", "content": "x" * body["max_tokens"]}
            return httpx.Response(200, json={"choices": [{"index": 0, "message": message}]})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream", "x-adapter-version": "1"},
            stream=_Body(self._events(body)),
        )

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(data: object) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        try:
            yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(self.token_delay_s)
                yield event({"choices": [{"index": 0, "delta": {"content": "x"}}]})
            usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}
            yield event({"choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


def _workload(**overrides: Any) -> Workload:
    fields: dict[str, Any] = {
        "concurrency": 4,
        "duration_s": 0.6,
        "adapters": ADAPTERS,
        "popularity": Popularity("zipf", 1.0),
        "prompt_len": LengthDist.parse("uniform:4:12"),
        "output_len": LengthDist.parse("uniform:5:10"),
        "seed": 3,
    }
    return Workload(**{**fields, **overrides})


async def test_closed_loop_keeps_exactly_n_requests_in_flight() -> None:
    server = FakeOpenAI()
    phase = await run_phase(
        Target(URL), _workload(concurrency=5), progress=None, transport=server.transport()
    )
    assert server.max_in_flight == 5  # reached, never exceeded
    ok = [r for r in phase.requests if r.status == "ok"]
    assert len(ok) > 20
    assert len(phase.requests) == len(server.bodies)
    # Closed loop: never more than 5 of the recorded requests overlap either.
    edges = sorted(
        [(r.start_s, 1) for r in phase.requests] + [(r.end_s or 0.0, -1) for r in phase.requests],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 5
    for r in ok:
        assert r.output_tokens == r.max_tokens  # the usage count
        assert r.prompt_tokens == 7
        assert r.ttft_s is not None and 0 < r.ttft_s <= (r.latency_s or 0)
        assert r.served_version == 1
    # Streamed chat completions, greedy, usage asked for.
    body = server.bodies[0]
    assert body["stream"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] in ADAPTERS
    s = summarize(phase)
    assert s.ok == len(ok)
    assert s.output_tok_per_s > 0


async def test_cut_off_requests_count_the_tokens_they_streamed() -> None:
    server = FakeOpenAI(token_delay_s=0.05)
    load = _workload(concurrency=3, duration_s=0.3, output_len=LengthDist.parse("100"))
    phase = await run_phase(Target(URL), load, progress=None, transport=server.transport())
    assert [r.status for r in phase.requests] == ["cancelled"] * 3
    assert all(3 <= r.output_tokens < 100 for r in phase.requests)
    s = summarize(phase)
    assert s.ok == 0 and s.cancelled == 3
    assert s.output_tok_per_s == pytest.approx(sum(r.output_tokens for r in phase.requests) / 0.3)
    assert server.in_flight == 0  # the streams were closed, not left hanging


async def test_open_loop_sends_at_the_poisson_times_whatever_the_server_pace() -> None:
    # A slow server (each request 0.5 to 1 s) and 60 req/s: a closed loop would wait for
    # answers, an open loop must not.
    server = FakeOpenAI(token_delay_s=0.1)
    load = _workload(mode="open", rate=60.0, duration_s=1.0)
    phase = await run_phase(Target(URL), load, progress=None, transport=server.transport())
    planned = arrival_times(60.0, 1.0, random.Random(load.seed + 1))
    assert len(phase.requests) == len(planned)
    # Sent on time (slack for a loaded machine, well below one request's 0.5 s).
    lags = [r.start_s - at for r, at in zip(phase.requests, planned, strict=True)]
    assert min(lags) >= 0 and max(lags) < 0.25, lags
    assert server.max_in_flight > 20


async def test_open_loop_drops_past_the_outstanding_cap() -> None:
    server = FakeOpenAI(token_delay_s=0.05)
    load = _workload(mode="open", rate=100.0, duration_s=0.5, max_outstanding=3)
    phase = await run_phase(Target(URL), load, progress=None, transport=server.transport())
    assert server.max_in_flight == 3
    assert phase.dropped > 0
    assert len(phase.requests) + phase.dropped == len(
        arrival_times(100.0, 0.5, random.Random(load.seed + 1))
    )


async def test_same_seed_same_requests_and_errors_are_recorded() -> None:
    a, b = FakeOpenAI(), FakeOpenAI(missing=frozenset({"a1"}))
    load = _workload(concurrency=1, duration_s=0.3)
    pa = await run_phase(Target(URL), load, progress=None, transport=a.transport())
    pb = await run_phase(Target(URL), load, progress=None, transport=b.transport())
    n = min(len(a.bodies), len(b.bodies), 5)
    assert [x["model"] for x in a.bodies[:n]] == [x["model"] for x in b.bodies[:n]]
    assert [x["messages"] for x in a.bodies[:n]] == [x["messages"] for x in b.bodies[:n]]
    failed = [r for r in pb.requests if r.adapter == "a1"]
    assert failed and all(r.status == "error" for r in failed)
    assert "NotFoundError" in (failed[0].error or "")
    assert summarize(pb).errors == len(failed)
    assert summarize(pa).errors == 0


async def test_named_users_leave_the_request_sequence_unchanged() -> None:
    plain, named = FakeOpenAI(), FakeOpenAI()
    load = _workload(concurrency=1, duration_s=0.3)
    await run_phase(Target(URL), load, progress=None, transport=plain.transport())
    phase = await run_phase(
        Target(URL), replace(load, users=3), progress=None, transport=named.transport()
    )
    n = min(len(plain.bodies), len(named.bodies))
    assert n >= 5
    assert "user" not in plain.bodies[0]
    users = [b["user"] for b in named.bodies[:n]]
    assert set(users) <= {"user-0", "user-1", "user-2"} and len(set(users)) > 1
    assert [r.user for r in phase.requests[:n]] == users
    # Its own random stream: the same prompts, models and lengths as without users.
    for key in ("model", "messages", "max_tokens"):
        assert [b[key] for b in plain.bodies[:n]] == [b[key] for b in named.bodies[:n]]


async def test_warm_up_touches_every_adapter_and_fails_when_nothing_works() -> None:
    server = FakeOpenAI()
    await warm_up(Target(URL), _workload(), 0, progress=None, transport=server.transport())
    assert {b["model"] for b in server.bodies} == {*ADAPTERS, "smollm2"}
    broken = FakeOpenAI(missing=frozenset({*ADAPTERS, "smollm2"}))
    with pytest.raises(RuntimeError, match="warm-up failed"):
        await warm_up(Target(URL), _workload(), 0, progress=None, transport=broken.transport())


async def test_against_our_app_with_a_hot_swap(tmp_path: Path) -> None:
    """The real app (fake engine): adapters from a folder, a new version mid-run."""
    adapters = tmp_path / "adapters"
    for i, name in enumerate(("a0", "a1")):
        make_adapter(adapters / name, seed=i)
    v2 = make_adapter(tmp_path / "allowed" / "v2", seed=5)
    settings = Settings(
        served_model_name="tiny",
        model=make_base(tmp_path / "base"),
        home=tmp_path / "home",
        admin_key="k",
        adapters_dir=adapters,
        allowed_roots=[tmp_path / "allowed"],
    )
    app = create_app(settings, engine=FakeEngine(token_delay_s=0.01))
    # Wide margins: the admin calls share this event loop with the load.
    load = _workload(
        adapters=("a0", "a1"),
        duration_s=2.0,
        swaps=(SwapEvent(0.4, "a0", source=str(v2)), SwapEvent(1.2, "a0", version=1)),
    )
    target = Target(URL, base_model="tiny", admin_key="k", model_format="{base}:{adapter}")
    async with app.router.lifespan_context(app):
        phase = await run_phase(target, load, progress=None, transport=httpx.ASGITransport(app=app))
    assert [(w.version, w.error) for w in phase.swaps] == [(2, None), (1, None)]
    swapped, rolled_back = (w.ended_s or 0.0 for w in phase.swaps)
    a0 = [r for r in phase.requests if r.adapter == "a0" and r.status == "ok"]
    assert {r.served_version for r in a0 if r.start_s < 0.4} == {1}
    assert {r.served_version for r in a0 if swapped < r.start_s < 1.2} == {2}
    assert {r.served_version for r in a0 if r.start_s > rolled_back} == {1}
    assert all(r.model.startswith("tiny:") for r in phase.requests)


_BURN = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < 0.6:
    pass
print("done", flush=True)
time.sleep(60)
"""


def test_cpu_meter_attributes_cpu_to_the_server_session() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _BURN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        meter = CpuMeter(child.pid).start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        cpu = meter.stop()
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    assert cpu["server_cpu_s"] == pytest.approx(0.6, abs=0.15)
    assert 0 <= cpu["loadgen_cores"] < cpu["server_cores"]  # this process mostly waited
    assert cpu["box_cores"] >= cpu["server_cores"] - 0.1
    assert session_cpu_s(999_999_999) is None


def test_adapter_pool_links_the_sources_under_many_names(tmp_path: Path) -> None:
    sources = [make_adapter(tmp_path / "src" / n, seed=i) for i, n in enumerate("xyz")]
    pool = make_adapter_pool(tmp_path / "pool", sources, 7)
    assert list(pool) == adapter_names(7) == [f"a{i:03d}" for i in range(7)]
    weights = "adapter_model.safetensors"
    assert (pool["a004"] / weights).read_bytes() == (sources[1] / weights).read_bytes()
    assert (pool["a006"] / "adapter_config.json").is_file()
    assert make_adapter_pool(tmp_path / "pool", sources, 7) == pool  # idempotent


# -- report and plots from a synthetic record ------------------------------------------


def _phase(
    name: str, active: int, tokens: int, latency: float, n: int = 20, others: float = 0.25
) -> PhaseRecord:
    """`n` requests of `tokens` tokens each, `latency` apart, over a 10 s window."""
    requests = [
        RequestRecord(
            start_s=i * 0.4,
            model="m",
            adapter=None,
            max_tokens=tokens,
            status="ok",
            end_s=i * 0.4 + latency,
            ttft_s=latency / 10,
            prompt_tokens=30,
            output_tokens=tokens,
        )
        for i in range(n)
    ]
    requests.append(
        RequestRecord(
            start_s=9.5,
            model="m",
            adapter=None,
            max_tokens=50,
            status="cancelled",
            end_s=10.0,
            output_tokens=10,
        )
    )
    requests.append(
        RequestRecord(
            start_s=1.0,
            model="m",
            adapter=None,
            max_tokens=50,
            end_s=1.1,
            error="NotFoundError: no such model",
        )
    )
    return PhaseRecord(
        name=name,
        mode="closed",
        duration_s=10.0,
        active_adapters=active,
        registered_adapters=100,
        popularity="zipf(alpha=1)",
        base_fraction=0.0,
        prompt_len="uniform:16:64",
        output_len="uniform:32:96",
        seed=0,
        concurrency=16,
        requests=requests,
        cpu={"server_cores": 1.5, "server_cpu_s": 15.0, "others_cores": others},
    )


def synthetic_record() -> RunRecord:
    ours = SystemRecord("ours", "(a) loraswap", notes=["100 registered"])
    ours.phases = [_phase("main", 8, 45, 1.0), _phase("active=1", 1, 50, 0.9)]
    ours.phases[0].swaps = [
        SwapRecord(
            at_s=5.0, adapter="a000", action="add_version /x", started_s=5.0, ended_s=5.2, version=2
        )
    ]
    vllm = SystemRecord("vllm", "(b) plain vLLM", phases=[_phase("main", 8, 30, 1.5)])
    vllm.phases.append(_phase("active=1", 1, 35, 1.4))
    return RunRecord(
        created="2026-01-01T00:00:00+00:00",
        command="python -m loadtests.compare --out x",
        host={"cores": 2},
        systems=[
            SystemRecord(
                "base", "(d) base alone", phases=[_phase("main", 0, 95, 0.8, others=0.01)]
            ),
            SystemRecord("vllm-base", "(e) base, no LoRA", phases=[_phase("main", 0, 100, 0.8)]),
            ours,
            vllm,
            SystemRecord("peft", "(c) naive PEFT", error="RuntimeError: exited with status 1"),
        ],
    )


def test_summary_of_a_synthetic_phase() -> None:
    s = summarize(_phase("main", 8, 45, 1.0))
    assert (s.ok, s.errors, s.cancelled) == (20, 1, 1)
    assert s.req_per_s == pytest.approx(2.0)
    assert s.output_tok_per_s == pytest.approx((20 * 45 + 10) / 10)  # cut-off tokens count
    assert s.latency_p50_s == pytest.approx(1.0)
    assert s.ttft_p50_s == pytest.approx(0.1)
    assert s.tpot_p50_s == pytest.approx(0.9 / 44)
    assert s.first_error == "NotFoundError: no such model"


def test_report_from_a_synthetic_record(tmp_path: Path) -> None:
    record = synthetic_record()
    record.write(tmp_path / "results.json")
    again = RunRecord.read(tmp_path / "results.json")
    assert again == record  # every request survives the JSON round trip
    text = render(again)
    main = text.split("## Main phase")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): line for line in main.splitlines() if "|" in line}
    # tok/s (20 requests + 10 cut-off tokens, in 10 s): base 191, ours 91, vLLM 61
    assert "| 191.0 |" in rows["(d) base alone"] and "| 91.0 |" in rows["(a) loraswap"]
    assert "0.48×" in rows["(a) loraswap"] and "1.49×" in rows["(a) loraswap"]
    assert "3.13×" in rows["(d) base alone"]
    # cores used, and 910 tokens / 15 server CPU-seconds; a busy neighbour is flagged
    assert "| 1.50 | 0.25 **(noisy)** | 60.7 |" in rows["(a) loraswap"]
    assert "| 1.50 | 0.01 | 127.3 |" in rows["(d) base alone"]
    assert "| 91.0 (noisy) |" in text
    assert "1.00×" in rows["(d) base alone"]
    assert "not measured: RuntimeError: exited with status 1" in rows["(c) naive PEFT"]
    # base through us (191 tok/s) against the LoRA-less engine (20 * 100 + 10 in 10 s)
    assert "against an engine without LoRA (e): 0.95× output tok/s" in main
    assert "| 20 / 1 / 1 |" in rows["(b) plain vLLM"]
    assert "## Output tok/s by number of active adapters" in text
    assert "| 1 active | 8 active |" in text.replace("0 active | ", "")
    assert "## Hot swaps" in text and "version 2 current" in text and "200 ms" in text
    assert "first error: `NotFoundError: no such model`" in text
    path = write_report(again, tmp_path / "no-plots", plots=False)
    assert path.read_text() == text


def test_plots_from_a_synthetic_record(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_report(synthetic_record(), tmp_path)
    images = sorted(p.name for p in tmp_path.glob("*.png"))
    assert images == ["latency_cdf.png", "throughput_vs_adapters.png", "ttft_over_time.png"]
    for name in images:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"![{name[:-4]}]({name})" in path.read_text()


def test_compare_warms_every_phase_with_its_own_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Sweep points read low unwarmed (issue 17): each phase gets a warm-up of its own
    load, the first `warmup_s`, the later ones `phase_warmup_s`, swaps never."""
    from loadtests import compare

    calls: list[tuple[str, float, tuple[str, ...], int]] = []

    @contextlib.contextmanager
    def running(launch: Any, port: int, log: Path, **_: Any) -> Iterator[Any]:
        yield servers.Running(URL, proc=Mock(pid=1), log=log, start_seconds=0.0)

    async def warm_up(target: Target, load: Workload, seconds: float, **_: Any) -> None:
        calls.append(("warm", seconds, load.adapters, len(load.swaps)))

    async def run_phase(target: Target, load: Workload, name: str, **_: Any) -> PhaseRecord:
        calls.append((name, load.duration_s, load.adapters, len(load.swaps)))
        return _phase(name, len(load.adapters), 10, 0.0)

    monkeypatch.setattr(servers, "running", running)
    monkeypatch.setattr(compare, "warm_up", warm_up)
    monkeypatch.setattr(compare, "run_phase", run_phase)
    monkeypatch.setattr(compare, "PAUSE_S", 0.0)
    main = _workload(swaps=(SwapEvent(at_s=0.1, adapter="a0", version=1),))
    phases = [("main", main), ("active=1", replace(main.with_active(1), swaps=(), duration_s=0.2))]
    launch = servers.Launch(name="ours", label="ours", cmd=["x"], env={})
    system = compare.measure(
        launch, 0, tmp_path, phases, 30.0, quiet=(99.0, 0.0), phase_warmup_s=10.0
    )
    assert system.error is None, system.error
    assert calls == [
        ("warm", 30.0, ADAPTERS, 0),
        ("main", main.duration_s, ADAPTERS, 1),
        ("warm", 10.0, ADAPTERS[:1], 0),
        ("active=1", 0.2, ADAPTERS[:1], 0),
    ]


def test_sweep_points_above_and_below_the_active_adapters() -> None:
    from loadtests.compare import sweep_loads

    names = [f"a{i:03d}" for i in range(10)]
    main = _workload(
        adapters=tuple(names[:4]), swaps=(SwapEvent(at_s=1, adapter="a000", version=1),)
    )
    points = sweep_loads(main, names, [SweepPoint(1), SweepPoint(8)], 5.0)
    assert [name for name, _ in points] == ["active=1", "active=8"]
    assert [p.adapters for _, p in points] == [tuple(names[:1]), tuple(names[:8])]
    assert all(p.swaps == () and p.duration_s == 5.0 for _, p in points)
    assert all(p.seed == main.seed and p.popularity == main.popularity for _, p in points)


def test_a_sweep_point_may_spread_its_requests_its_own_way() -> None:
    """One compare run gives the 8-of-100 Zipf rows and the 128-of-1,000 uniform row."""
    from loadtests.compare import sweep_loads

    points = sweep_points("1,4,128:uniform")
    assert [p.label for p in points] == ["active=1", "active=4", "active=128,uniform"]
    names = [f"a{i:03d}" for i in range(200)]
    main = _workload(
        adapters=tuple(names[:4]), swaps=(SwapEvent(at_s=1, adapter="a000", version=1),)
    )
    loads = dict(sweep_loads(main, names, points, 5.0))
    # the point like the main phase measures it without its hot swaps
    assert loads["active=4"].popularity == main.popularity and loads["active=4"].swaps == ()
    assert loads["active=128,uniform"].popularity == Popularity("uniform")
    assert loads["active=128,uniform"].adapters == tuple(names[:128])
    for bad in ("0", "8:often", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            sweep_points(bad)
