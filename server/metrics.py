"""Every Prometheus metric, in one place, and the one-line JSON log of each request.

Label cardinality stays bounded with thousands of adapters: the first `max_label_values`
distinct adapters (and tenants) seen get their own label value, every later one is
reported as "other". Versions and alias variants are labelled only for adapters that
have their own value. So the series count is bounded by a setting, not by the registry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from adapters_registry.experiments import Exposure, Feedback

log = logging.getLogger("loraswap.requests")

# From 5 ms (GPU TTFT) to minutes (a long CPU generation under load).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OTHER = "other"


@dataclass
class RequestInfo:
    """What one request did; filled in as it goes, observed when its response ends."""

    request_id: str
    method: str
    path: str
    started: float
    status: int = 0
    route: str = ""  # the matched route's template (server/lifecycle.py: route_label)
    model: str = ""
    adapter: str = ""
    version: str = ""
    variant: str = ""
    tenant: str = ""
    # A/B: set when an alias served the request, for its exposure row (server/experiments)
    alias: str = ""
    response_id: str = ""  # the id in the response body (chatcmpl-..., cmpl-..., resp_...)
    digest: str = ""  # the version's content digest (not logged: long, and in the registry)
    user_hash: str = ""  # sha256 of the end user (not logged)
    exposure_id: str = ""  # the id of its exposure row (shadow runs refer to it; not logged)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    ended: float = 0.0

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


class _Bounded:
    """Label values, capped: past `limit` distinct values everything new is OTHER."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if not value or value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class Metrics:
    def __init__(self, max_label_values: int = 100) -> None:
        self.registry = CollectorRegistry()
        self._adapter = _Bounded(max_label_values)
        self._tenant = _Bounded(max_label_values)
        self._alias = _Bounded(max_label_values)
        # Feedback metric names are chosen by callers: bounded like adapters.
        self._outcome = _Bounded(max_label_values)
        self._add_request_metrics(self.registry)
        self._add_engine_metrics(self.registry)
        self._add_experiment_metrics(self.registry)
        self._add_arm_metrics(self.registry)

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Inference requests: outcome, tokens and timings per adapter, arm and tenant."""
        labels = ["adapter", "version", "variant", "tenant"]
        self.requests = Counter(
            "loraswap_requests",
            "Inference requests by final status.",
            ["route", *labels, "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("loraswap_prompt_tokens", "Prompt tokens.", labels, registry=r)
        self.completion_tokens = Counter(
            "loraswap_completion_tokens", "Completion tokens.", labels, registry=r
        )
        self.ttft = Histogram(
            "loraswap_time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loraswap_time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=_TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "loraswap_request_latency_seconds",
            "End-to-end latency.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def _add_engine_metrics(self, r: CollectorRegistry) -> None:
        """Adapters in and out of the engine, and the load it holds."""
        self.adapter_loads = Counter(
            "loraswap_adapter_loads", "Adapter versions loaded.", ["adapter"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "loraswap_adapter_load_seconds",
            "Time to load an adapter version.",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "loraswap_adapter_load_failures",
            "Adapter loads refused or failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "loraswap_adapter_evictions", "Adapter versions released from the engine.", registry=r
        )
        self.adapters_resident = Gauge(
            "loraswap_adapters_resident", "Adapter versions held in the engine.", registry=r
        )
        self.adapters_registered = Gauge(
            "loraswap_adapters_registered", "Adapters in the registry.", registry=r
        )
        self.in_flight = Gauge(
            "loraswap_requests_in_flight",
            "Inference requests admitted and not finished (queue depth).",
            registry=r,
        )
        self.engine_running = Gauge(
            "loraswap_engine_running_requests",
            "Requests the engine holds (running or waiting).",
            registry=r,
        )
        # vLLM's own gauge, in vLLM's format, for the Kubernetes Gateway API inference
        # extension: value = a timestamp, adapter names comma-joined in labels.
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )

    def _add_experiment_metrics(self, r: CollectorRegistry) -> None:
        """A/B experiments (server/experiments): the exposure log, shadows, guardrails."""
        self.exposures_written = Counter(
            "loraswap_exposures_written", "Exposure rows written to the database.", registry=r
        )
        self.exposures_dropped = Counter(
            "loraswap_exposures_dropped",
            "Exposures not recorded, by reason (queue_full: the writer fell behind; "
            "write_failed: the database refused a batch).",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "write_failed"):  # both series exist from the start
            self.exposures_dropped.labels(reason)
        self.exposures_queued = Gauge(
            "loraswap_exposures_queued", "Exposures waiting to be written.", registry=r
        )
        self.shadow_requests = Counter(
            "loraswap_shadow_requests",
            "Requests sampled for an alias's shadow adapter, by outcome (run: both outputs "
            "recorded; dropped: the server was busy, the shadow was not started or was "
            "aborted; failed: the shadow's own error, the client's request unaffected).",
            ["alias", "outcome"],
            registry=r,
        )
        self.shadows_running = Gauge(
            "loraswap_shadows_running", "Shadow runs in the engine now.", registry=r
        )
        self.guardrail_rollbacks = Counter(
            "loraswap_guardrail_rollbacks",
            "Alias arms set to weight 0 by a guardrail, by alias, arm and rule.",
            ["alias", "variant", "rule"],
            registry=r,
        )

    def _add_arm_metrics(self, r: CollectorRegistry) -> None:
        """Per alias and arm (the requests' own series have the arm but not the alias, and
        one arm key may serve several aliases): what the Experiments row plots."""
        experiment = ["alias", "variant"]
        self.exposures = Counter(
            "loraswap_exposures",
            "Requests served through an alias (exposures), by alias, arm and status.",
            [*experiment, "status"],
            registry=r,
        )
        self.exposure_latency = Histogram(
            "loraswap_exposure_latency_seconds",
            "End-to-end latency of successful requests served through an alias.",
            experiment,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # First outcomes per (response, metric); a later change of an outcome (last write
        # wins in the database and the report) is not counted again, as in the guardrails.
        self.feedback_labels = Summary(
            "loraswap_feedback_label",
            "Binary feedback outcomes (1 positive, 0 negative): _count outcomes, _sum "
            "positives, by alias, arm and feedback metric.",
            [*experiment, "metric"],
            registry=r,
        )
        self.feedback_scores = Summary(
            "loraswap_feedback_score",
            "Numeric feedback outcomes: _count and _sum, by alias, arm and feedback metric.",
            [*experiment, "metric"],
            registry=r,
        )

    def _experiment(self, alias: str, variant: str) -> tuple[str, str]:
        bounded = self._alias(alias)
        return bounded, variant if bounded not in ("", OTHER) else ""

    def observe_exposure(self, exposure: Exposure) -> None:
        """An exposure listener (server/experiments/log.py)."""
        labels = self._experiment(exposure.alias, exposure.variant)
        self.exposures.labels(*labels, str(exposure.status)).inc()
        if exposure.status == 200:
            self.exposure_latency.labels(*labels).observe(exposure.latency_s)

    def observe_feedback(self, exposure: Exposure, feedback: Feedback) -> None:
        """A first outcome recorded for `exposure` (POST /v1/feedback)."""
        labels = (
            *self._experiment(exposure.alias, exposure.variant),
            self._outcome(feedback.metric),
        )
        if feedback.label is not None:
            self.feedback_labels.labels(*labels).observe(feedback.label)
        if feedback.score is not None:
            self.feedback_scores.labels(*labels).observe(feedback.score)

    def observe(self, info: RequestInfo) -> None:
        adapter = self._adapter(info.adapter)
        bounded = adapter not in ("", OTHER)
        values = (
            adapter,
            info.version if bounded else "",
            info.variant if bounded else "",
            self._tenant(info.tenant),
        )
        # The route template, never the raw path: one series per route the app has.
        self.requests.labels(info.route, *values, str(info.status)).inc()
        if info.status != 200:
            return
        self.prompt_tokens.labels(*values).inc(info.prompt_tokens)
        self.completion_tokens.labels(*values).inc(info.completion_tokens)
        self.latency.labels(*values).observe(info.latency_s)
        if info.ttft_s is not None:
            self.ttft.labels(*values).observe(info.ttft_s)
            if info.completion_tokens > 1:
                decode = info.latency_s - info.ttft_s
                self.tpot.labels(*values).observe(decode / (info.completion_tokens - 1))

    def load_timer(self, adapter: str) -> Callable[[BaseException | None], None]:
        start = time.perf_counter()

        def done(error: BaseException | None) -> None:
            if error is None:
                self.adapter_loads.labels(self._adapter(adapter)).inc()
                self.adapter_load_seconds.observe(time.perf_counter() - start)
            else:
                self.adapter_load_failures.labels(type(error).__name__).inc()

        return done

    def render(self, *, max_lora: int, running_adapters: Iterable[str]) -> bytes:
        self.lora_info.clear()
        self.lora_info.labels(str(max_lora), ",".join(sorted(set(running_adapters))), "").set(
            time.time()
        )
        return bytes(generate_latest(self.registry))


def log_request(info: RequestInfo) -> None:
    """One JSON line per request: who, what served it, outcome, tokens, timings."""
    record = {k: v for k, v in asdict(info).items() if v not in ("", None)}
    record["latency_ms"] = round(1000 * info.latency_s, 1)
    if info.ttft_s is not None:
        record["ttft_ms"] = round(1000 * info.ttft_s, 1)
    for key in ("started", "ended", "ttft_s", "digest", "user_hash", "exposure_id"):
        record.pop(key, None)
    log.info(json.dumps(record, separators=(",", ":")))
