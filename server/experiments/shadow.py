"""Shadow traffic: a candidate adapter judged on real requests before any user sees it.

An alias may name a shadow adapter (`name` or `name@N`) and a fraction
(`PUT /admin/aliases/{name}/shadow`). Each request served through the alias is sampled
for it independently, with that probability: per request rather than sticky per user,
because no user sees a shadow's reply, so there is no experience to keep consistent,
and independent draws make the shadowed requests a plain random sample of the traffic
(requests without a user can be sampled too).

A sampled request runs as usual; its first engine request keeps its engine input (the
rendered, tokenized prompt) and sampling parameters, and its output
(server/engine/openai_layer.py `ShadowCapture`). Once its response is over, and only if
it succeeded, the same input runs again on the shadow adapter, straight on the engine:

- never delaying the client's request: it starts only after that request's response has
  gone, at the engine's lowest priority (vLLM's priority scheduler, our default, serves
  every client request first and preempts the shadow first when memory runs short);
- dropped first under load: it starts only while at most `shadow_max_busy` client
  requests are in flight and fewer than `shadow_max_running` shadows run, and a client
  request admitted past `shadow_max_busy` aborts the running ones; each dropped one is
  counted (`loraswap_shadow_requests_total{outcome="dropped"}`) and recorded;
- outside the client's account: no quota, no concurrency slot, no `max_in_flight` place;
  it holds a lease on its adapter version like any request, so it is loaded and stays
  while it runs;
- invisible to the client: its reply is read for its tokens and discarded; its failures
  are logged and counted (`outcome="failed"`), never raised into the request.

The tenant of the request must be allowed to use the shadow adapter (as it would to name
it), or the shadow fails: an alias must not become a way into an adapter its users could
not name.

Each sampled request gets one shadow-run row next to its exposure (adapters_registry/
experiments.py `ShadowRun`): outcome, the version the shadow ran on, both completion
token counts and engine latencies (the request's own, under whatever load it met; the
shadow's, on a quiet server), and for greedy requests (temperature 0) whether the two
outputs were the same tokens. The report of the alias sums them up.

Each replica reads the shadows at start and keeps the ones set through it; a shadow set
through another replica sharing the database applies here after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from adapters_registry.experiments import ShadowConfig, ShadowRun
from server.adapters import AdapterRouter, Lease
from server.engine.openai_layer import OpenAILayer, ShadowCapture, ShadowOutput
from server.experiments.log import ExposureLog
from server.metrics import Metrics, RequestInfo
from server.quotas import Admission
from server.settings import ExperimentsSettings

log = logging.getLogger("loraswap.experiments")

# vLLM's priority scheduler serves lower numbers first; client requests get their
# tenant's number of requests in flight (server/quotas.py), far below this.
SHADOW_PRIORITY = 1 << 30


class _Busy(Exception):
    """The server became busy before the shadow reached the engine."""


class Shadows:
    def __init__(
        self,
        router: AdapterRouter,
        layer: OpenAILayer,
        quotas: Admission,
        log_: ExposureLog,
        metrics: Metrics,
        settings: ExperimentsSettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._router = router
        self._layer = layer
        self._quotas = quotas
        self._log = log_
        self._metrics = metrics
        self._settings = settings
        self.rng = rng or random.Random()
        self._configs: dict[str, ShadowConfig] = {}
        self._running: set[asyncio.Task[None]] = set()
        router.pool.add_reachable(self._pinned)

    # -- configuration --------------------------------------------------------------------

    def load(self) -> None:
        """Read every alias's shadow (at start)."""
        self._configs = self._log.store.shadows()

    def get(self, alias: str) -> ShadowConfig | None:
        return self._configs.get(alias)

    async def set(self, alias: str, config: ShadowConfig | None) -> None:
        """Store (None: remove) an alias's shadow, in force for the next request."""
        await asyncio.to_thread(self._log.store.put_shadow, alias, config)
        if config is None:
            self._configs.pop(alias, None)
        else:
            self._configs[alias] = config
        await self._router.release_unreachable()  # a version pinned by it alone may go

    def _pinned(self, adapter: str, version: int) -> bool:
        return any(c.adapter == adapter and c.version == version for c in self._configs.values())

    # -- the hot path ---------------------------------------------------------------------

    def sample(self, alias: str) -> ShadowConfig | None:
        """The alias's shadow if this request is to run on it too (drawn per request)."""
        config = self._configs.get(alias)
        if config is None or config.fraction <= 0:
            return None
        if config.fraction >= 1 or self.rng.random() < config.fraction:
            return config
        return None

    @property
    def busy(self) -> bool:
        return self._quotas.in_flight > self._settings.shadow_max_busy

    @property
    def running(self) -> int:
        return len(self._running)

    def pressure(self) -> None:
        """A client request was admitted: past `shadow_max_busy`, running shadows go."""
        if self._running and self.busy:
            for task in list(self._running):
                task.cancel()

    def submit(
        self, config: ShadowConfig, info: RequestInfo, tenant: str | None, capture: ShadowCapture
    ) -> None:
        """The sampled request is over (its exposure queued): run its shadow, or drop it.
        Synchronous and cheap; never raises into the request's teardown."""
        try:
            if info.status != 200 or not capture.complete or not info.exposure_id:
                return  # nothing to compare with: its exposure says how it went
            if self.busy or len(self._running) >= self._settings.shadow_max_running:
                self._record(config, info, capture, "dropped")
                return
            task = asyncio.get_running_loop().create_task(self._run(config, info, tenant, capture))
            self._running.add(task)
            self._metrics.shadows_running.set(len(self._running))
            task.add_done_callback(self._done)
        except Exception:
            log.exception("shadow of request %s not run", info.request_id)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._metrics.shadows_running.set(len(self._running))

    async def _run(
        self, config: ShadowConfig, info: RequestInfo, tenant: str | None, capture: ShadowCapture
    ) -> None:
        lease: Lease | None = None
        adapter: tuple[str, int] | None = None
        try:
            target = await self._router.version_of(config.adapter, config.version, tenant)
            assert target.version is not None
            adapter = (target.version.adapter, target.version.version)
            lease = await self._router.acquire(target)
            if self.busy:  # loading took a while, and the server filled meanwhile
                raise _Busy
            out = await self._layer.run_shadow(
                capture, lease.handle, f"{info.request_id}.shadow", SHADOW_PRIORITY
            )
        except (asyncio.CancelledError, _Busy):
            self._record(config, info, capture, "dropped", adapter)
        except Exception as exc:
            log.warning(
                "shadow %s of alias %s failed for request %s: %s",
                config.key,
                info.alias,
                info.request_id,
                exc,
            )
            self._record(config, info, capture, "failed", adapter)
        else:
            self._record(config, info, capture, "run", adapter, out)
        finally:
            if lease is not None:
                lease.release()

    def _record(
        self,
        config: ShadowConfig,
        info: RequestInfo,
        capture: ShadowCapture,
        outcome: str,
        adapter: tuple[str, int] | None = None,
        out: ShadowOutput | None = None,
    ) -> None:
        self._metrics.shadow_requests.labels(info.alias, outcome).inc()
        match = None
        if out is not None and capture.greedy:
            match = out.tokens == capture.tokens
        self._log.record_shadow(
            ShadowRun(
                exposure_id=info.exposure_id,
                shadow=config.key,
                adapter=None if adapter is None else adapter[0],
                version=None if adapter is None else adapter[1],
                outcome=outcome,
                greedy=capture.greedy,
                control_tokens=capture.completion_tokens,
                control_latency_s=capture.latency_s,
                shadow_tokens=None if out is None else out.completion_tokens,
                shadow_latency_s=None if out is None else out.latency_s,
                greedy_match=match,
                created_at=time.time(),
            )
        )

    async def close(self) -> None:
        """Abort the shadows still running (at shutdown): their rows say dropped."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def settle(self) -> None:
        """Wait for the shadows running now (tests)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
            await asyncio.sleep(0)  # their done callbacks take them out of the set
