"""`loraswap experiments ...`: feedback on responses, the report of an alias's experiment,
its guardrails, ramp and shadow.

Like the other admin commands (server/cli_admin.py) these talk HTTP through
`clients.Client`. `feedback` acts as a tenant when given `--api-key` (the tenant whose
request it was), else as the operator with the admin key; `report` is an admin call.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from clients import DEFAULT_URL
from server.cli_admin import (
    AdminKey,
    AliasName,
    AsJson,
    ClientFactory,
    Url,
    _query,
    _session,
    default_client,
    err,
    out,
)

ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LORASWAP_API_KEY",
        help="The tenant's API key (default: act as the operator with the admin key).",
        show_default=False,
    ),
]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _interval(ci: list[float] | None, digits: int = 3) -> str:
    return "-" if not ci else f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def arms_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"alias {report['alias']}: {report['exposures']} exposures")
    for column in ("arm", "weight", "exposures", "users", "error rate"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for column in ("p50 ms", "p95 ms", "TTFT p50 ms", "TTFT p95 ms", "tokens in/out"):
        table.add_column(column, justify="right")
    for arm in report["variants"]:
        table.add_row(
            arm["variant"] + (" (control)" if arm["control"] else ""),
            str(arm["weight"]),
            str(arm["exposures"]),
            str(arm["users"]),
            _fmt(arm["error_rate"]),
            _ms(arm["latency_s"]["p50"]),
            _ms(arm["latency_s"]["p95"]),
            _ms(arm["ttft_s"]["p50"]),
            _ms(arm["ttft_s"]["p95"]),
            f"{arm['prompt_tokens']}/{arm['completion_tokens']}",
        )
    return table


def metrics_table(report: dict[str, Any]) -> Table:
    table = Table(title="outcomes (95% intervals; against the control)")
    for column in ("metric", "arm", "n", "mean", "95% CI", "difference", "lift", "p-value"):
        table.add_column(column, justify="left" if column in ("metric", "arm") else "right")
    for metric in report["metrics"]:
        for arm in report["variants"]:
            for kind, block in arm["metrics"].get(metric, {}).items():
                versus = block.get("vs_control") or {}
                lift = versus.get("lift")
                table.add_row(
                    f"{metric} ({kind})",
                    arm["variant"],
                    str(block["count"]),
                    _fmt(block["mean"]),
                    _interval(block["ci95"]),
                    _fmt(versus.get("difference")) + " " + _interval(versus.get("ci95")),
                    "-"
                    if lift is None
                    else f"{100 * lift:+.1f}% " + _percent(versus.get("lift_ci95")),
                    _fmt(versus.get("p_value"), 4),
                )
    return table


def _percent(ci: list[float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]"


def srm_line(report: dict[str, Any]) -> str:
    srm = report.get("srm")
    if srm is None:
        return "sample ratio: not checked (fewer than two weighted arms with exposures)"
    verdict = "[red]MISMATCH[/red]" if srm["flagged"] else "ok"
    observed = ", ".join(f"{k}={v}" for k, v in srm["observed"].items())
    return f"sample ratio: {verdict} (chi-square p = {srm['p_value']:.3g}; {observed})"


def shadow_table(report: dict[str, Any]) -> Table:
    table = Table(title="shadow traffic (outputs recorded, never returned)")
    for column in ("shadow", "sampled", "runs", "dropped", "failed", "greedy match"):
        table.add_column(column, justify="left" if column == "shadow" else "right")
    for column in ("tokens control/shadow", "latency ms control/shadow"):
        table.add_column(column, justify="right")
    for s in report["shadow"]:
        control, candidate = s["control"], s["candidate"]
        match = (
            "-"
            if s["match_rate"] is None
            else f"{s['greedy_matches']}/{s['greedy_compared']} {_interval(s['match_rate_ci95'])}"
        )
        table.add_row(
            s["shadow"],
            str(s["sampled"]),
            str(s["runs"]),
            str(s["dropped"]),
            str(s["failed"]),
            match,
            f"{_fmt(control['completion_tokens_mean'], 1)}/"
            f"{_fmt(candidate['completion_tokens_mean'], 1)}",
            f"{_ms(control['latency_s_mean'])}/{_ms(candidate['latency_s_mean'])}",
        )
    return table


def make_experiments_app(connect: ClientFactory = default_client) -> typer.Typer:
    """The `experiments` commands, each opening its client through `connect`."""
    app = typer.Typer(
        help="A/B experiments over aliases: feedback and reports.", no_args_is_help=True
    )

    @app.command("feedback")
    def feedback(
        response_id: Annotated[
            str | None,
            typer.Argument(help="The response's id (chatcmpl-...).", show_default=False),
        ] = None,
        request_id: Annotated[
            str | None,
            typer.Option("--request-id", help="Or the request's x-request-id.", show_default=False),
        ] = None,
        label: Annotated[
            str | None,
            typer.Option("--label", help="positive, negative, 1 or 0.", show_default=False),
        ] = None,
        score: Annotated[
            float | None, typer.Option("--score", help="A numeric outcome.", show_default=False)
        ] = None,
        metric: Annotated[str, typer.Option("--metric", help="The outcome's name.")] = "default",
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
        api_key: ApiKey = None,
        as_json: AsJson = False,
    ) -> None:
        """Record an outcome of a response (sending it again replaces it)."""
        value: str | int | None = label
        if label in ("0", "1"):
            value = int(label)
        with _session(connect, url, admin_key) as client:
            client.api_key = api_key or admin_key
            result = client.feedback(
                response_id, request_id=request_id, label=value, score=score, metric=metric
            )
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        outcome = ", ".join(
            part
            for part in (
                None if result["label"] is None else f"label {result['label']}",
                None if result["score"] is None else f"score {result['score']}",
            )
            if part
        )
        out.print(
            f"{result['response_id']} ({result['alias']}: {result['variant']}): "
            f"{result['metric']} = {outcome}"
        )

    @app.command("report")
    def report(
        name: AliasName,
        since: Annotated[
            str | None,
            typer.Option(help="Window start: Unix seconds or ISO 8601.", show_default=False),
        ] = None,
        until: Annotated[
            str | None, typer.Option(help="Window end (excluded).", show_default=False)
        ] = None,
        control: Annotated[
            str | None,
            typer.Option(help="The control arm (default: the first).", show_default=False),
        ] = None,
        plot: Annotated[
            Path | None,
            typer.Option(
                "--plot",
                help="Also write a PNG of each metric's running mean with its 95% interval "
                "per arm over time to this file.",
                show_default=False,
            ),
        ] = None,
        metric: Annotated[
            str | None,
            typer.Option(help="With --plot: only this metric.", show_default=False),
        ] = None,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
        as_json: AsJson = False,
    ) -> None:
        """Per-arm statistics of an alias: exposures, errors, latency, outcomes against
        the control, and the sample-ratio-mismatch check."""
        if plot is not None:
            with _session(connect, url, admin_key) as client:
                png = client.experiment_plot(name, since=since, until=until, metric=metric)
                plot.write_bytes(png)  # OSError: one line on stderr, like the calls'
            err.print(f"plot written to {plot}")
        result = _query(
            connect,
            url,
            admin_key,
            lambda client: client.experiment_report(
                name, since=since, until=until, control=control
            ),
            as_json,
        )
        if result is None:
            return
        out.print(arms_table(result))
        if result["metrics"]:
            out.print(metrics_table(result))
        if result.get("shadow"):
            out.print(shadow_table(result))
        out.print(srm_line(result))

    @app.command("guardrails")
    def guardrails(
        name: AliasName,
        min_exposures: Annotated[
            int, typer.Option(min=1, help="Exposures an arm needs before it is judged.")
        ] = 100,
        max_error_rate: Annotated[
            float | None,
            typer.Option(min=0, max=1, help="Largest 5xx share of an arm.", show_default=False),
        ] = None,
        max_p95_latency_ratio: Annotated[
            float | None,
            typer.Option(help="Largest p95 latency over the control's.", show_default=False),
        ] = None,
        metric: Annotated[
            str | None, typer.Option(help="A feedback metric to guard.", show_default=False)
        ] = None,
        min_metric_ratio: Annotated[
            float | None,
            typer.Option(help="Smallest mean of --metric over the control's.", show_default=False),
        ] = None,
        control: Annotated[
            str | None, typer.Option(help="The control arm (default: the first).")
        ] = None,
        clear: Annotated[bool, typer.Option("--clear", help="Remove the limits.")] = False,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
        as_json: AsJson = False,
    ) -> None:
        """Show an alias's guardrails and rollbacks; with a limit, set them (an arm past
        one gets weight 0 at once); --clear removes them."""
        setting = any(
            v is not None for v in (max_error_rate, max_p95_latency_ratio, metric, min_metric_ratio)
        )
        with _session(connect, url, admin_key) as client:
            if clear:
                result = client.delete_guardrails(name)
            elif setting:
                result = client.set_guardrails(
                    name,
                    min_exposures=min_exposures,
                    max_error_rate=max_error_rate,
                    max_p95_latency_ratio=max_p95_latency_ratio,
                    metric=metric,
                    min_metric_ratio=min_metric_ratio,
                    control=control,
                )
            else:
                result = client.get_guardrails(name)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        limits = result["limits"]
        if limits is None:
            out.print(f"{name}: no guardrails")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None)
            out.print(f"{name}: {shown}")
        for event in result["events"]:
            when = (
                datetime.fromtimestamp(event["created_at"]).astimezone().isoformat(" ", "seconds")
            )
            out.print(
                f"  {when} {event['variant']} -> weight 0 ({event['rule']}: {event['detail']})"
            )

    @app.command("ramp")
    def ramp(
        name: AliasName,
        candidate: Annotated[
            str | None, typer.Option(help="The arm to ramp up.", show_default=False)
        ] = None,
        steps: Annotated[
            str | None,
            typer.Option(help="Its shares in percent: 1,5,25,50,100.", show_default=False),
        ] = None,
        every_exposures: Annotated[
            int | None, typer.Option(min=1, help="Next step after N exposures.", show_default=False)
        ] = None,
        every_s: Annotated[
            float | None, typer.Option(help="Next step after N seconds.", show_default=False)
        ] = None,
        stop: Annotated[bool, typer.Option("--stop", help="Stop the ramp.")] = False,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
        as_json: AsJson = False,
    ) -> None:
        """Show an alias's ramp; with --candidate and --steps, start one; --stop ends it
        (the weights stay)."""
        try:
            shares = None if steps is None else [float(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(f"--steps: {steps!r} is not a list of numbers") from None
        with _session(connect, url, admin_key) as client:
            if stop:
                result = client.delete_ramp(name)
            elif candidate is not None and shares:
                result = client.set_ramp(
                    name, candidate, shares, every_exposures=every_exposures, every_s=every_s
                )
            else:
                result = client.get_ramp(name)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        shown = ", ".join(f"{s:g}%" for s in result["steps"])
        out.print(
            f"{name}: {result['candidate']} at {result['percent']:g}% "
            f"(step {result['step'] + 1} of {len(result['steps'])}: {shown}); {result['state']}"
        )

    @app.command("shadow")
    def shadow(
        name: AliasName,
        adapter: Annotated[
            str | None,
            typer.Option(help="The shadow adapter: name or name@N.", show_default=False),
        ] = None,
        fraction: Annotated[
            float | None,
            typer.Option(
                min=0, max=1, help="Share of the alias's requests (0..1).", show_default=False
            ),
        ] = None,
        clear: Annotated[bool, typer.Option("--clear", help="Stop the shadow traffic.")] = False,
        url: Url = DEFAULT_URL,
        admin_key: AdminKey = None,
        as_json: AsJson = False,
    ) -> None:
        """Show an alias's shadow; with --adapter and --fraction, set it (sampled requests
        also run on it, after their response, dropped first under load; its replies are
        recorded, never returned); --clear stops it."""
        if (adapter is None) != (fraction is None):
            raise typer.BadParameter("--adapter and --fraction go together")
        with _session(connect, url, admin_key) as client:
            if clear:
                result = client.delete_shadow(name)
            elif adapter is not None and fraction is not None:
                result = client.set_shadow(name, adapter, fraction)
            else:
                result = client.get_shadow(name)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        state = "; stopped" if clear else ""
        out.print(
            f"{name}: shadow {result['adapter']} on {result['fraction']:.0%} of requests{state}"
        )

    return app


experiments_app = make_experiments_app()
