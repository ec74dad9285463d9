"""A/B experiments on an alias: feedback and exposures (tenant key), and the report,
plot, guardrails, shadow traffic and ramps (admin key)."""

from __future__ import annotations

from collections.abc import Sequence

from clients._endpoints.calls import content, delete, endpoint, given, put, read, with_query
from clients._wire import Op, Spec, json_body, segment
from clients.types import JSON, ExposureInfo, FeedbackInfo


class OutcomeEndpoints:
    """What a tenant reports and asks about its own responses served through an alias."""

    @endpoint
    def feedback(
        self,
        /,
        response_id: str | None = None,
        *,
        request_id: str | None = None,
        label: str | int | bool | None = None,
        score: float | None = None,
        metric: str = "default",
    ) -> Op[FeedbackInfo]:
        """Report an outcome of a response served through an alias: its `response_id`
        (`completion.body["id"]`) or `request_id`, and a `label` ("positive"/"negative",
        1/0, True/False) and/or a numeric `score`, under `metric`. Sending it again
        replaces it (the last one counts). NotFoundError: no such response of yours."""
        if isinstance(label, bool):
            label = int(label)
        body = given(
            response_id=response_id, request_id=request_id, label=label, score=score, metric=metric
        )
        # Idempotent per (response, metric) on the server: safe to send twice.
        return Op(Spec("POST", "/v1/feedback", "api", replayable=True, json=body), json_body)

    @endpoint
    def exposure(self, response_id: str) -> Op[ExposureInfo]:
        """Which alias arm served one of your responses (by response id)."""
        spec = Spec("GET", f"/v1/exposures/{segment(response_id)}", "api", replayable=True)
        return Op(spec, json_body)


class ExperimentEndpoints:
    """An alias's experiment as the operator runs it: its statistics, and the controls
    that move traffic between its arms (guardrails, shadow, ramp)."""

    @endpoint
    def experiment_report(
        self,
        alias: str,
        *,
        since: float | str | None = None,
        until: float | str | None = None,
        control: str | None = None,
    ) -> Op[JSON]:
        """The statistics of alias `alias`'s experiment (admin): per arm exposures, users,
        errors, latency, tokens, each metric's mean and 95% interval, and against the
        `control` arm (default: the first) difference, lift and p-value; and the
        sample-ratio-mismatch check. `since`/`until`: Unix seconds or ISO 8601."""
        path = f"/admin/aliases/{segment(alias)}/experiment"
        return Op(read(with_query(path, since=since, until=until, control=control)), json_body)

    @endpoint
    def experiment_plot(
        self,
        alias: str,
        *,
        since: float | str | None = None,
        until: float | str | None = None,
        metric: str | None = None,
    ) -> Op[bytes]:
        """A PNG of alias `alias`'s experiment (admin): each feedback metric's running
        mean with its 95% interval, per arm, over time (`metric`: only that one)."""
        path = f"/admin/aliases/{segment(alias)}/experiment/plot.png"
        return Op(read(with_query(path, since=since, until=until, metric=metric)), content)

    @endpoint
    def set_guardrails(
        self,
        alias: str,
        *,
        min_exposures: int = 100,
        max_error_rate: float | None = None,
        max_p95_latency_ratio: float | None = None,
        metric: str | None = None,
        min_metric_ratio: float | None = None,
        control: str | None = None,
    ) -> Op[JSON]:
        """Set alias `alias`'s guardrails (admin): an arm past a limit, judged over at
        least `min_exposures` of its exposures, gets weight 0 at once. Limits:
        `max_error_rate` (5xx share), `max_p95_latency_ratio` (its p95 over the
        control's), `metric` + `min_metric_ratio` (its mean outcome over the control's).
        Answers the limits and the rollbacks so far."""
        body = given(
            min_exposures=min_exposures,
            max_error_rate=max_error_rate,
            max_p95_latency_ratio=max_p95_latency_ratio,
            metric=metric,
            min_metric_ratio=min_metric_ratio,
            control=control,
        )
        return Op(put(_control(alias, "guardrails"), body), json_body)

    @endpoint
    def get_guardrails(self, alias: str) -> Op[JSON]:
        """An alias's guardrail limits and its rollbacks (`events`: rule, numbers, time)."""
        return Op(read(_control(alias, "guardrails")), json_body)

    @endpoint
    def delete_guardrails(self, alias: str) -> Op[JSON]:
        """Remove an alias's guardrails (its rollbacks stay on record)."""
        return Op(delete(_control(alias, "guardrails")), json_body)

    @endpoint
    def set_shadow(self, alias: str, adapter: str, fraction: float) -> Op[JSON]:
        """Run `fraction` (0..1, drawn per request) of alias `alias`'s requests also on
        `adapter` (`name` or `name@N`) (admin): after each sampled request, at the lowest
        priority, dropped first under load; its replies are recorded (lengths, latencies,
        whether greedy outputs matched: see the report), never returned."""
        body = {"adapter": adapter, "fraction": fraction}
        return Op(put(_control(alias, "shadow"), body), json_body)

    @endpoint
    def get_shadow(self, alias: str) -> Op[JSON]:
        """An alias's shadow: `adapter` and `fraction`."""
        return Op(read(_control(alias, "shadow")), json_body)

    @endpoint
    def delete_shadow(self, alias: str) -> Op[JSON]:
        """Stop an alias's shadow traffic (its runs stay on record)."""
        return Op(delete(_control(alias, "shadow")), json_body)

    @endpoint
    def set_ramp(
        self,
        alias: str,
        candidate: str,
        steps: Sequence[float],
        *,
        every_exposures: int | None = None,
        every_s: float | None = None,
    ) -> Op[JSON]:
        """Ramp arm `candidate` of `alias` up (admin): `steps` are its share in percent
        (`[1, 5, 25, 50, 100]`), the first applied at once, the next after
        `every_exposures` exposures and/or `every_s` seconds, each only while the
        guardrails hold (a guardrail taking the candidate out halts the ramp)."""
        body = given(
            candidate=candidate,
            steps=list(steps),
            every_exposures=every_exposures,
            every_s=every_s,
        )
        return Op(put(_control(alias, "ramp"), body), json_body)

    @endpoint
    def get_ramp(self, alias: str) -> Op[JSON]:
        """An alias's ramp: its schedule, `step`, `percent` and `state` (running, done,
        halted)."""
        return Op(read(_control(alias, "ramp")), json_body)

    @endpoint
    def delete_ramp(self, alias: str) -> Op[JSON]:
        """Stop an alias's ramp; the weights stay as they are."""
        return Op(delete(_control(alias, "ramp")), json_body)


def _control(alias: str, control: str) -> str:
    """The path of one of an alias's traffic controls (guardrails, shadow, ramp)."""
    return f"/admin/aliases/{segment(alias)}/{control}"
