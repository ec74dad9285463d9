"""How the CLI shows the server's records: rich tables and one-line summaries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.table import Table

from clients import AdapterInfo, AliasInfo, TenantInfo, VersionInfo

# -- adapters, aliases, tenants --------------------------------------------------------


def describe(v: VersionInfo) -> str:
    size, sha = human_size(v["size_bytes"]), v["sha256"][:12]
    return f"{v['adapter']} v{v['version']} (rank {v['rank']}, {size}, sha256 {sha})"


def adapters_table(adapters: Sequence[AdapterInfo]) -> Table:
    table = Table(
        "adapter", "current", "versions", "pinned", "loaded", "owner", "shared", "created"
    )
    for a in adapters:
        loaded = [
            f"v{v['version']}" + (f" ({v['running']} running)" if v["running"] else "")
            for v in a["versions"]
            if v["loaded"]
        ]
        table.add_row(
            a["name"],
            str(a["current_version"] or "-"),
            str(len(a["versions"])),
            "yes" if a["pinned"] else "",
            ", ".join(loaded),
            a["owner"] or "-",
            "yes" if a["shared"] else "",
            when(a["created_at"]),
        )
    return table


def versions_table(adapter: AdapterInfo) -> Table:
    table = Table(
        "version",
        "sha256",
        "size",
        "rank",
        "alpha",
        "targets",
        "defaults",
        "loaded",
        "source",
        "created",
    )
    for v in adapter["versions"]:
        current = v["version"] == adapter["current_version"]
        table.add_row(
            f"{v['version']}{' *' if current else ''}",
            v["sha256"][:12],
            human_size(v["size_bytes"]),
            str(v["rank"]),
            f"{v['alpha']:g}",
            ",".join(v["target_modules"]),
            ",".join(v.get("defaults") or ()),  # the names: `--json` shows the values
            (f"yes ({v['running']} running)" if v["running"] else "yes") if v["loaded"] else "",
            v["source"],
            when(v["created_at"]),
        )
    return table


def aliases_table(aliases: Sequence[AliasInfo]) -> Table:
    table = Table("alias", "variants", "owner", "shared", "updated")
    for a in aliases:
        table.add_row(
            a["name"],
            variants(a),
            a["owner"] or "-",
            "yes" if a["shared"] else "",
            when(a["updated_at"]),
        )
    return table


def tenants_table(tenants: Sequence[TenantInfo]) -> Table:
    table = Table("tenant", "max concurrent", "tokens/minute", "keys", "running", "created")
    for t in tenants:
        table.add_row(
            t["name"],
            quota_text(t["max_concurrent"]),
            quota_text(t["tokens_per_minute"]),
            ", ".join(t["key_ids"]),
            str(t["running"]),
            when(t["created_at"]),
        )
    return table


def access(record: AdapterInfo | AliasInfo) -> str:
    owner = f"owner {record['owner']}" if record["owner"] else "owner: the operator"
    return f"{owner}, {'shared with every tenant' if record['shared'] else 'private'}"


def quotas(tenant: TenantInfo) -> str:
    return (
        f"max concurrent {quota_text(tenant['max_concurrent'])}, "
        f"tokens/minute {quota_text(tenant['tokens_per_minute'])}"
    )


def quota_text(value: int | None) -> str:
    return "no limit" if value is None else str(value)


def variants(alias: AliasInfo) -> str:
    total = sum(alias["variants"].values()) or 1
    return ", ".join(
        f"{key}={weight} ({100 * weight / total:.0f}%)" for key, weight in alias["variants"].items()
    )


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(3, (n.bit_length() - 1) // 10)  # 1 KiB, 2 MiB, 3 GiB
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M")


# -- experiments -----------------------------------------------------------------------


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
