"""The load generator: closed loop (N users, each sending its next request when the last
one ends) or open loop (Poisson arrivals at a set rate, whatever the server's pace),
streamed chat completions through `clients.AsyncClient`, with an optional hot-swap
schedule running beside the load.

Every request is a streamed chat completion (`stream_options.include_usage`): streaming
is what gives the time to first token, and all servers compared here speak it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import httpx

from clients import AsyncClient, LoraswapError
from loadtests.cpu import CpuMeter
from loadtests.record import PhaseRecord, RequestRecord, SwapRecord, summarize
from loadtests.workload import (
    LengthDist,
    ModelSampler,
    Popularity,
    SwapEvent,
    arrival_times,
    make_prompt,
)

Progress = Callable[[str], None]

# After a failed request a closed-loop user waits this long before the next one: a server
# that fails instantly would otherwise be flooded by a hot loop that also starves the
# (shared) machine; it is short next to any real request.
ERROR_BACKOFF_S = 0.1


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    """A server under load. `model_format` spells an adapter request's `model`:
    `{adapter}` (a bare name: what vLLM expects, and ours and the PEFT baseline accept) or
    `{base}:{adapter}` (our canonical spelling)."""

    url: str
    base_model: str = "smollm2"
    api_key: str | None = None
    admin_key: str | None = None
    model_format: str = "{adapter}"
    label: str = ""

    def model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.base_model
        return self.model_format.format(base=self.base_model, adapter=adapter)


@dataclass(frozen=True)
class Workload:
    """What one phase sends. `adapters` are the active ones, most popular first."""

    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 16
    rate: float = 4.0
    duration_s: float = 60.0
    adapters: tuple[str, ...] = ()
    registered: int = 0
    popularity: Popularity = field(default_factory=Popularity)
    base_fraction: float = 0.0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist.parse("uniform:16:64"))
    output_len: LengthDist = field(default_factory=lambda: LengthDist.parse("uniform:32:96"))
    seed: int = 0
    swaps: tuple[SwapEvent, ...] = ()
    max_outstanding: int = 1024
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    # > 0: each request names one of this many end users (`user`, drawn uniformly), as an
    # alias's sticky assignment and the exposure log see them; 0: no `user`.
    users: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.users < 0:
            raise ValueError("users must be >= 0")
        if self.concurrency < 1 or self.max_outstanding < 1:
            raise ValueError("concurrency and max_outstanding must be >= 1")
        if not self.duration_s > 0:
            raise ValueError("the duration must be > 0")

    def with_active(self, n: int) -> Workload:
        """The same workload on the `n` most popular of its adapters."""
        return replace(self, adapters=self.adapters[:n])


@contextlib.asynccontextmanager
async def connect(
    target: Target, workload: Workload, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[AsyncClient]:
    """A client for `target`, with no retries (a load test reports failures, it does not
    hide them) and one connection per possible request at once: httpx's default pool
    (100) would otherwise queue an open-loop burst inside the client, unseen by the server.
    """
    limit = (workload.concurrency if workload.mode == "closed" else workload.max_outstanding) + 4
    async with (
        httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(workload.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        ) as http,
        AsyncClient(
            target.url,
            api_key=target.api_key,
            admin_key=target.admin_key,
            http_client=http,
            max_retries=0,
        ) as client,
    ):
        yield client


class _Phase:
    def __init__(
        self,
        target: Target,
        workload: Workload,
        client: AsyncClient,
        name: str,
        progress: Progress | None,
        progress_every_s: float,
    ) -> None:
        self.target = target
        self.workload = workload
        self.client = client
        self.progress = progress
        self.progress_every_s = progress_every_s
        # Separate streams: the arrival times must not depend on what the requests drew,
        # so the same seed gives the same arrivals and the same request sequence.
        self.rng = random.Random(workload.seed)
        # Its own stream: naming users leaves the prompts and lengths of a seed unchanged.
        self.user_rng = random.Random(f"users-{workload.seed}")
        self.arrival_rng = random.Random(workload.seed + 1)
        self.sampler = ModelSampler(
            workload.adapters,
            workload.popularity,
            random.Random(workload.seed + 2),
            workload.base_fraction,
        )
        self.record = PhaseRecord(
            name=name,
            mode=workload.mode,
            duration_s=workload.duration_s,
            active_adapters=len(workload.adapters),
            registered_adapters=max(workload.registered, len(workload.adapters)),
            popularity=workload.popularity.describe() if workload.adapters else "none",
            base_fraction=self.sampler.base_fraction,
            prompt_len=workload.prompt_len.describe(),
            output_len=workload.output_len.describe(),
            seed=workload.seed,
            concurrency=workload.concurrency if workload.mode == "closed" else None,
            rate=workload.rate if workload.mode == "open" else None,
        )
        self.t0 = 0.0
        self.inflight = 0
        self.streamed = 0  # text chunks received so far, for the progress line

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self) -> PhaseRecord:
        self.t0 = time.perf_counter()
        self.record.started_at = time.time()
        side = [asyncio.create_task(self._swaps())]
        if self.progress is not None:
            side.append(asyncio.create_task(self._report_progress()))
        try:
            if self.workload.mode == "closed":
                await self._closed()
            else:
                await self._open()
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        return self.record

    # -- load --------------------------------------------------------------------------

    async def _closed(self) -> None:
        async def user() -> None:
            while self.now() < self.workload.duration_s:
                if not await self._send(*self._next_request()):
                    await asyncio.sleep(ERROR_BACKOFF_S)

        users = [asyncio.create_task(user()) for _ in range(self.workload.concurrency)]
        await self._until(self.workload.duration_s)
        await _cancel(users)

    async def _open(self) -> None:
        running: set[asyncio.Task[bool]] = set()
        times = arrival_times(self.workload.rate, self.workload.duration_s, self.arrival_rng)
        for at in times:
            await self._until(at)
            if len(running) >= self.workload.max_outstanding:
                self.record.dropped += 1
                continue
            # Drawn and recorded now: a task cancelled before its first step (an arrival
            # just before the end) still shows up in the record, as cut off.
            task = asyncio.create_task(self._send(*self._next_request()))
            running.add(task)
            task.add_done_callback(running.discard)
        await self._until(self.workload.duration_s)
        await _cancel(list(running))

    async def _until(self, at_s: float) -> None:
        delay = at_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def _next_request(self) -> tuple[RequestRecord, str]:
        """The next request of the sequence (the same for every system, given the seed),
        recorded as sent now and cut off until it ends; and its prompt."""
        wl = self.workload
        adapter = self.sampler.sample()
        prompt = make_prompt(wl.prompt_len.sample(self.rng), self.rng)
        record = RequestRecord(
            start_s=self.now(),
            model=self.target.model_for(adapter),
            adapter=adapter,
            max_tokens=wl.output_len.sample(self.rng),
            status="cancelled",
            user=f"user-{self.user_rng.randrange(wl.users)}" if wl.users else None,
        )
        self.record.requests.append(record)
        return record, prompt

    async def _send(self, record: RequestRecord, prompt: str) -> bool:
        """One streamed chat completion into `record`; False when it failed."""
        wl = self.workload
        self.inflight += 1
        chunks = 0
        usage: dict[str, int] | None = None
        try:
            stream = await self.client.chat_stream(
                record.model,
                [{"role": "user", "content": prompt}],
                max_tokens=record.max_tokens,
                temperature=wl.temperature,
                stream_options={"include_usage": True},
                **({"user": record.user} if record.user is not None else {}),
            )
            record.served_version = stream.served_by.adapter_version
            async with stream:
                async for chunk in stream:
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            chunks += 1
                            self.streamed += 1
                            if record.ttft_s is None:
                                record.ttft_s = self.now() - record.start_s
            record.status = "ok"
        except Exception as exc:  # a load generator reports failures, it does not stop
            record.status = "error"
            record.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            record.end_s = self.now()
            self.inflight -= 1
            if usage is not None:
                record.prompt_tokens = usage.get("prompt_tokens")
            # The usage count is exact, but only a finished stream has it.
            if record.status == "ok" and usage is not None:
                record.output_tokens = int(usage.get("completion_tokens", chunks))
            else:
                record.output_tokens = chunks
        return record.status == "ok"

    # -- hot swaps ---------------------------------------------------------------------

    async def _swaps(self) -> None:
        for event in sorted(self.workload.swaps, key=lambda e: e.at_s):
            await self._until(event.at_s)
            action = (
                f"add_version {event.source}"
                if event.source is not None
                else f"set_current {event.version}"
            )
            swap = SwapRecord(at_s=event.at_s, adapter=event.adapter, action=action)
            self.record.swaps.append(swap)
            swap.started_s = self.now()
            try:
                if self.client.admin_key is None:
                    raise LoraswapError("hot swaps need an admin key")
                if event.source is not None:
                    info = await self.client.add_version(event.adapter, event.source)
                    swap.version = info["version"]
                else:
                    assert event.version is not None
                    adapter = await self.client.set_current(event.adapter, event.version)
                    swap.version = adapter["current_version"]
            except LoraswapError as exc:
                swap.error = f"{type(exc).__name__}: {exc}"[:300]
            except asyncio.CancelledError:
                swap.error = "still running when the phase ended"
                swap.ended_s = self.now()
                raise
            swap.ended_s = self.now()
            if self.progress is not None:
                outcome = swap.error or f"now version {swap.version}"
                self.progress(
                    f"[{self.target.label}] swap {event.describe()} at {swap.started_s:.1f}s: "
                    f"{outcome} ({(swap.ended_s - swap.started_s) * 1000:.0f} ms)"
                )

    # -- console -----------------------------------------------------------------------

    async def _report_progress(self) -> None:
        assert self.progress is not None
        while True:
            await asyncio.sleep(self.progress_every_s)
            t = self.now()
            partial = replace(self.record, duration_s=max(t, 1e-9))
            s = summarize(partial)
            ttft = f"{s.ttft_p50_s:.2f}s" if s.ttft_p50_s is not None else "-"
            # Tokens as they stream (the record counts a request's tokens when it ends).
            self.progress(
                f"[{self.target.label}] {self.record.name} {t:5.0f}/{self.workload.duration_s:g}s"
                f"  done {s.ok:4d}  err {s.errors}  in flight {self.inflight:3d}"
                f"  {self.streamed / t:7.1f} tok/s  {s.req_per_s:5.2f} req/s  p50 TTFT {ttft}"
            )


async def _cancel(tasks: Sequence[asyncio.Task[object]] | Sequence[asyncio.Task[bool]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_phase(
    target: Target,
    workload: Workload,
    name: str = "main",
    *,
    progress: Progress | None = print_progress,
    progress_every_s: float = 5.0,
    transport: httpx.AsyncBaseTransport | None = None,
    server_sid: int | None = None,
) -> PhaseRecord:
    """Run one measured window of `workload` against `target`; every request recorded.

    `server_sid`: the session id of the server's processes, when it runs on this
    machine, to record its CPU use over the window (see loadtests/cpu.py)."""
    async with connect(target, workload, transport) as client:
        phase = _Phase(target, workload, client, name, progress, progress_every_s)
        meter = CpuMeter(server_sid).start()
        record = await phase.run()
        record.cpu = meter.stop()
        return record


async def warm_up(
    target: Target,
    workload: Workload,
    seconds: float,
    *,
    progress: Progress | None = print_progress,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PhaseRecord | None:
    """Load every active adapter (one short request each, so no adapter load lands in
    the measured window), then run the workload for `seconds`, unrecorded, without
    swaps. Raises if no warm-up request succeeds: measuring a broken server is pointless.
    """
    if progress is not None:
        progress(f"[{target.label}] warm-up: {len(workload.adapters)} adapters, {seconds:g} s")
    prime = replace(
        workload,
        mode="closed",
        concurrency=max(1, min(workload.concurrency, len(workload.adapters) or 1)),
        swaps=(),
        output_len=LengthDist.parse("4"),
    )
    failures: list[str] = []
    names: list[str | None] = [*workload.adapters, None]
    async with connect(target, prime, transport) as client:
        limit = asyncio.Semaphore(prime.concurrency)

        async def one(adapter: str | None) -> None:
            async with limit:
                try:
                    await client.chat(
                        target.model_for(adapter),
                        [{"role": "user", "content": "Hello."}],
                        max_tokens=4,
                        temperature=0.0,
                    )
                except LoraswapError as exc:
                    failures.append(f"{target.model_for(adapter)}: {exc}")

        await asyncio.gather(*(one(a) for a in names))
    if len(failures) == len(names):
        raise RuntimeError(f"warm-up failed for every model, e.g. {failures[0]}")
    if failures and progress is not None:
        progress(f"[{target.label}] warm-up failures: {'; '.join(failures[:3])}")
    if seconds <= 0:
        return None
    return await run_phase(
        target,
        replace(workload, duration_s=seconds, swaps=(), seed=workload.seed + 1000),
        "warm-up",
        progress=None,
        transport=transport,
    )
