"""The exposure log's writer: off the hot path, bounded, never failing a request.

A request served through an alias is described by its `RequestInfo` once its response is
over (the admission middleware's `observe`, server/lifecycle.py). `record` turns that into
an `Exposure` and appends it to an in-memory queue: O(1) on the event loop, no I/O. A
background task writes the queue in batches, one transaction each, on a worker thread
(`flush_interval_s`, or sooner when a batch is full). When the writer falls behind and
the queue is full, new exposures are dropped and counted (`loraswap_exposures_dropped`):
the request they describe has already been answered and is never delayed for its row.
A batch the database refuses is dropped and counted too, after one retry, so that a
database outage cannot grow memory without bound.

Retention runs in the same task: exposures older than `retention_days`, then all but the
newest `max_rows`, every `prune_interval_s`.

Shadow runs (server/experiments/shadow.py) go through the same writer, in a queue of
their own with the same bound, written after the exposures queued before them: a shadow
run refers to its exposure, and the exposure is queued first (when its response ends;
the shadow runs after that).

Durability: an exposure is in the database within about `flush_interval_s` of its
response; feedback lookups flush first (see `flush`), so that a caller's feedback on a
response it has just received always finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from adapters_registry.experiments import ExperimentStore, Exposure, ShadowRun
from server.metrics import Metrics, RequestInfo
from server.settings import ExperimentsSettings

log = logging.getLogger("loraswap.experiments")


def exposure_of(info: RequestInfo, now: float | None = None) -> Exposure | None:
    """The exposure row of a finished request, None if no alias served it."""
    if not info.alias or not info.response_id:
        return None
    return Exposure(
        exposure_id=info.exposure_id or uuid.uuid4().hex,
        response_id=info.response_id,
        request_id=info.request_id,
        alias=info.alias,
        variant=info.variant,
        adapter=info.adapter,
        version=int(info.version),
        content_digest=info.digest,
        tenant=info.tenant or None,
        user_hash=info.user_hash or None,
        created_at=time.time() if now is None else now,
        # The client left before any response started: as the metrics count it.
        status=info.status or 499,
        prompt_tokens=info.prompt_tokens,
        completion_tokens=info.completion_tokens,
        ttft_s=info.ttft_s,
        latency_s=max(info.latency_s, 0.0),
    )


class ExposureLog:
    def __init__(
        self,
        store: ExperimentStore,
        settings: ExperimentsSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[Exposure] = deque()
        self._shadow_queue: deque[ShadowRun] = deque()
        self._full_batch = asyncio.Event()
        # One writer at a time, so batches land in the order they were queued.
        self._writing = asyncio.Lock()
        self._last_prune = 0.0
        self.listeners: list[Callable[[Exposure], None]] = []

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._shadow_queue)

    def record(self, info: RequestInfo) -> None:
        """Queue the exposure of a finished request (if an alias served it). Never blocks,
        never raises: a full queue drops it, counted."""
        if not self._settings.exposure_log:
            return
        try:
            exposure = exposure_of(info, self._clock())
        except Exception:  # runs in the request's teardown: never let it fail there
            log.exception("exposure of request %s not recorded", info.request_id)
            return
        if exposure is None:
            return
        for listen in self.listeners:
            try:
                listen(exposure)
            except Exception:  # a guardrail bug must not reach the request's teardown
                log.exception("exposure listener failed")
        if len(self._queue) >= self._settings.queue_max:
            self._metrics.exposures_dropped.labels("queue_full").inc()
            return
        self._queue.append(exposure)
        self._metrics.exposures_queued.set(len(self._queue))
        if len(self._queue) >= self._settings.batch_size:
            self._full_batch.set()

    def record_shadow(self, run: ShadowRun) -> None:
        """Queue a shadow run's row (after its exposure's). Never blocks, never raises."""
        if not self._settings.exposure_log:
            return
        if len(self._shadow_queue) >= self._settings.queue_max:
            self._metrics.exposures_dropped.labels("queue_full").inc()
            return
        self._shadow_queue.append(run)

    async def flush(self) -> int:
        """Write everything queued now; the number of exposures written."""
        written = 0
        async with self._writing:
            while self._queue or self._shadow_queue:
                # Exposures first: a shadow run queued meanwhile finds its exposure there.
                while self._queue:
                    n = min(len(self._queue), self._settings.batch_size)
                    batch = [self._queue.popleft() for _ in range(n)]
                    self._metrics.exposures_queued.set(len(self._queue))
                    written += await self._write(batch, self.store.add_exposures, exposures=True)
                if self._shadow_queue:
                    n = min(len(self._shadow_queue), self._settings.batch_size)
                    runs = [self._shadow_queue.popleft() for _ in range(n)]
                    await self._write(runs, self.store.add_shadow_runs, exposures=False)
        return written

    async def _write(
        self, batch: Sequence[Any], add: Callable[[Any], object], *, exposures: bool
    ) -> int:
        for attempt in range(2):
            try:
                await asyncio.to_thread(add, batch)
            except Exception:
                if attempt == 0:
                    log.warning("writing %d rows failed; retrying once", len(batch))
                    await asyncio.sleep(0.1)
                    continue
                log.exception("dropping %d rows: the database refused them", len(batch))
                self._metrics.exposures_dropped.labels("write_failed").inc(len(batch))
                return 0
            if exposures:
                self._metrics.exposures_written.inc(len(batch))
            return len(batch)
        return 0

    async def prune(self) -> int:
        """Apply retention now; the number of exposures deleted."""
        s = self._settings
        older = None if s.retention_days is None else self._clock() - s.retention_days * 86400
        dropped = await asyncio.to_thread(self.store.prune, older_than=older, max_rows=s.max_rows)
        if dropped:
            log.info("retention: deleted %d exposures", dropped)
        return dropped

    async def run(self) -> None:
        """The background writer: until cancelled (then `close` writes what is left)."""
        while True:
            # asyncio.TimeoutError: not the builtin one before Python 3.11
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._full_batch.wait(), self._settings.flush_interval_s)
            self._full_batch.clear()
            try:
                await self.flush()
                if time.monotonic() - self._last_prune >= self._settings.prune_interval_s:
                    self._last_prune = time.monotonic()
                    await self.prune()
            except Exception:  # never let the writer die: the next round tries again
                log.exception("exposure log round failed")

    async def close(self) -> None:
        """Write what is still queued (at shutdown, after the last request)."""
        await self.flush()
