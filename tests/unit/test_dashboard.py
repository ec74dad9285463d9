"""The Grafana dashboard queries only what the server really exposes.

Every PromQL expression of deploy/grafana/dashboards/loraswap.json (panels and template
variables) is taken apart: its metric names, the labels of its matchers and of its
`by (...)` clauses. They are checked against a real scrape of /metrics from the app (fake
engine) after requests that make the labelled series appear, including a failed load.
A typo in a metric or label name fails the test; so does a metric with no panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.engine.base import LoraHandle
from server.errors import EngineUnavailable
from server.metrics import Metrics
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "loraswap.json"
# Added by Prometheus at scrape time (and `le`, `quantile` are part of the exposition).
TARGET_LABELS = {"job", "instance"}

# PromQL aggregations and functions (Prometheus 2.x / 3.x). A misspelt function is an error.
_FUNCTION_NAMES = """
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
limit_ratio abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month
day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count
histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
double_exponential_smoothing holt_winters hour idelta increase irate label_join label_replace
ln log2 log10 minute month predict_linear rate resets round scalar sgn sort sort_desc
sort_by_label sort_by_label_desc sqrt time timestamp vector year avg_over_time min_over_time
max_over_time sum_over_time count_over_time quantile_over_time stddev_over_time
stdvar_over_time last_over_time present_over_time mad_over_time label_values
"""
PROMQL_FUNCTIONS = frozenset(_FUNCTION_NAMES.split())
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atop", "inf", "nan"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


class Query:
    """What one PromQL expression refers to."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.metrics: set[str] = set()
        self.matcher_labels: dict[str, set[str]] = {}
        self.grouping_labels: set[str] = set()
        self.functions: set[str] = set()
        text = _STRING.sub('""', expr)
        text = _RANGE.sub("", text)
        for labels in _GROUPING.findall(text):
            self.grouping_labels |= {x.strip() for x in labels.split(",") if x.strip()}
        text = _GROUPING.sub(" ", text)

        def selector(match: re.Match[str]) -> str:
            name = match.group(1)
            if not name:
                raise ValueError(f"selector without a metric name in {expr!r}")
            self.matcher_labels.setdefault(name, set()).update(_MATCHER.findall(match.group(2)))
            return f" {name} "

        text = _SELECTOR.sub(selector, text)
        for name, call in _IDENT.findall(text):
            if call:
                self.functions.add(name)
            elif name.lower() not in KEYWORDS:
                self.metrics.add(name)


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, Query, str]]:
    """(where, query, legendFormat) for every panel target, annotation and template variable."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield (
                f"panel {panel['title']!r} {target['refId']}",
                Query(target["expr"]),
                (target.get("legendFormat", "")),
            )
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            text = annotation.get("titleFormat", "") + annotation.get("textFormat", "")
            yield f"annotation {annotation['name']!r}", Query(annotation["expr"]), text
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", query)
            assert match, f"variable {var['name']}: unexpected query {query!r}"
            q = Query(match.group(1))
            q.grouping_labels.add(match.group(2))
            yield f"variable {var['name']!r}", q, ""


class Scrape(NamedTuple):
    series: dict[str, set[str]]  # sample name (with _total/_bucket/... suffix) -> label names
    families: set[str]  # metric names as registered (no suffix)


def parse_scrape(text: str) -> Scrape:
    series: dict[str, set[str]] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    # The text format shows a counter's or histogram's `_created` sample as a family of its own.
    created = {f for f in families if f.endswith("_created") and f[: -len("_created")] in families}
    return Scrape(series, families - created)


def check_dashboard(dashboard: dict[str, Any], scrape: Scrape) -> list[str]:
    """Every problem found; empty when each query refers only to exposed series."""
    series = scrape.series
    problems = []
    used: set[str] = set()
    for where, q, legend in dashboard_queries(dashboard):
        if not q.metrics:
            problems.append(f"{where}: no metric in {q.expr!r}")
        for fn in sorted(q.functions - PROMQL_FUNCTIONS):
            problems.append(f"{where}: unknown PromQL function {fn!r}")
        available = set(TARGET_LABELS)
        for name in sorted(q.metrics):
            used.add(name)
            if name not in series:
                problems.append(f"{where}: metric {name!r} is not exposed by /metrics")
                continue
            available |= series[name]
            for label in sorted(q.matcher_labels.get(name, set()) - series[name] - TARGET_LABELS):
                problems.append(f"{where}: {name} has no label {label!r}")
        for label in sorted(q.grouping_labels - available):
            problems.append(f"{where}: grouping label {label!r} is on none of {sorted(q.metrics)}")
        for label in sorted(set(_LEGEND.findall(legend)) - available):
            problems.append(f"{where}: legend label {label!r} is on none of {sorted(q.metrics)}")
    for family in sorted(scrape.families):
        if not used & {family + suffix for suffix in ("", "_total", "_bucket", "_sum", "_count")}:
            problems.append(f"metric {family!r} has no panel")
    return problems


class FlakyLoads(FakeEngine):
    """Fails to load adapters whose name starts with 'broken' (a load failure, by reason)."""

    async def add_lora(self, lora: LoraHandle) -> None:
        if lora.name.startswith("broken"):
            raise EngineUnavailable("the engine refused the adapter")
        await super().add_lora(lora)


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    tmp = tmp_path_factory.mktemp("dashboard")
    make_base(tmp / "base")
    make_adapter(tmp / "adapters" / "pirate")
    make_adapter(tmp / "adapters" / "broken")
    settings = Settings(
        served_model_name="tiny",
        model=tmp / "base",
        adapters_dir=tmp / "adapters",
        home=tmp / "home",
        admin_key="k",
    )
    with TestClient(create_app(settings, engine=FlakyLoads())) as client:
        body = {"prompt": "hello", "max_tokens": 4}
        for model, status in (("tiny:pirate", 200), ("tiny", 200), ("nope", 404)):
            r = client.post("/v1/completions", json={**body, "model": model})
            assert r.status_code == status, r.text
        assert client.post("/v1/completions", json={**body, "model": "tiny:broken"}).is_error
        # Time to first token and per output token are seen in streams only.
        stream = {**body, "model": "tiny:pirate", "stream": True}
        with client.stream("POST", "/v1/completions", json=stream) as r:
            assert r.status_code == 200
            r.read()
        # An alias arm taken out by a guardrail: the rollback series (server/experiments).
        admin = {"authorization": "Bearer k"}
        ab = {"variants": {"pirate": 1, "broken": 1}}
        assert client.put("/admin/aliases/ab", headers=admin, json=ab).status_code == 200
        guard = {"min_exposures": 1, "max_error_rate": 0.5}
        assert client.put("/admin/aliases/ab/guardrails", headers=admin, json=guard).is_success
        # Its requests also run on a shadow: the shadow series (server/experiments/shadow.py).
        shadow = {"adapter": "pirate", "fraction": 1}
        assert client.put("/admin/aliases/ab/shadow", headers=admin, json=shadow).is_success
        served = []
        for i in range(20):
            r = client.post("/v1/completions", json={**body, "model": "ab", "user": f"u{i}"})
            if r.status_code == 200:
                served.append(r.json()["id"])
        # Feedback on an alias response: the per-arm outcome series.
        outcome = {"response_id": served[0], "metric": "thumbs", "label": 1, "score": 4.5}
        assert client.post("/v1/feedback", headers=admin, json=outcome).status_code == 200
        text = client.get("/metrics", headers=admin).text
    return parse_scrape(text)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_scrape_has_the_labelled_series(scrape: Scrape) -> None:
    # Guards the fixture: without these the checks below would test too little.
    series = scrape.series
    # Every metric server/metrics.py defines is in the scrape.
    assert scrape.families == {m.name for m in Metrics().registry.collect()}
    assert {"adapter", "tenant", "status", "route"} <= series["loraswap_requests_total"]
    assert "reason" in series["loraswap_adapter_load_failures_total"]
    assert "le" in series["loraswap_time_per_output_token_seconds_bucket"]
    assert "running_lora_adapters" in series["vllm:lora_requests_info"]
    assert {"alias", "variant", "rule"} <= series["loraswap_guardrail_rollbacks_total"]
    assert {"alias", "outcome"} <= series["loraswap_shadow_requests_total"]
    assert {"alias", "variant", "status"} <= series["loraswap_exposures_total"]
    assert {"alias", "variant", "le"} <= series["loraswap_exposure_latency_seconds_bucket"]
    for outcome in ("label", "score"):
        assert {"alias", "variant", "metric"} <= series[f"loraswap_feedback_{outcome}_sum"]


def test_every_query_uses_exposed_metrics_and_labels(
    dashboard: dict[str, Any], scrape: Scrape
) -> None:
    assert check_dashboard(dashboard, scrape) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("loraswap_requests_total{", "loraswap_request_total{", "'loraswap_request_total' is not"),
        ("seconds_bucket{", "seconds{", "_seconds' is not exposed"),
        ('tenant=~"$tenant"', 'tennant=~"$tenant"', "has no label 'tennant'"),
        ("sum by (reason)", "sum by (raeson)", "grouping label 'raeson'"),
        ("histogram_quantile(", "histogram_quantil(", "unknown PromQL function"),
        ("vllm:lora_requests_info{", "vllm_lora_requests_info{", "'vllm_lora_requests_info'"),
    ],
)
def test_the_check_catches_typos(
    dashboard: dict[str, Any], scrape: Scrape, old: str, new: str, problem: str
) -> None:
    broken = json.loads(json.dumps(dashboard).replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))
    assert broken != dashboard
    problems = check_dashboard(broken, scrape)
    assert any(problem in p for p in problems), problems


def test_a_metric_without_panel_is_reported(dashboard: dict[str, Any], scrape: Scrape) -> None:
    extra = Scrape(
        {**scrape.series, "loraswap_new_thing_total": set()},
        scrape.families | {"loraswap_new_thing"},
    )
    assert check_dashboard(dashboard, extra) == ["metric 'loraswap_new_thing' has no panel"]


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "loraswap-overview"
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "adapter", "tenant"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = []
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                assert target["expr"].strip()
    assert len(ids) == len(set(ids))
    exprs = [q.expr for _, q, _ in dashboard_queries(dashboard)]
    # Quantiles come from rate() over the _bucket series, summed by le.
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert quantiles and all("_bucket{" in e and "rate(" in e and "by (le" in e for e in quantiles)


def test_experiment_panels_are_per_alias_and_arm(dashboard: dict[str, Any]) -> None:
    """Exposures, errors, latency and feedback each by alias and arm, filtered by $alias;
    guardrail rollbacks also as annotations."""
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"alias", "window"} <= variables
    per_arm: dict[str, Query] = {}
    for where, q, _ in dashboard_queries(dashboard):
        if where.startswith("variable"):
            continue
        for name in q.metrics:
            if name.startswith(
                ("loraswap_exposures_total", "loraswap_exposure_latency", "loraswap_feedback_")
            ):
                per_arm[name] = q
                assert {"alias", "variant"} <= q.grouping_labels, where
                assert "alias" in q.matcher_labels[name], where
    assert {
        "loraswap_exposures_total",
        "loraswap_exposure_latency_seconds_bucket",
        "loraswap_feedback_label_count",
        "loraswap_feedback_label_sum",
        "loraswap_feedback_score_count",
        "loraswap_feedback_score_sum",
    } <= set(per_arm)
    annotations = [Query(a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    assert any("loraswap_guardrail_rollbacks_total" in a.metrics for a in annotations)


def test_query_parser() -> None:
    q = Query(
        'histogram_quantile(0.9, sum by (le, adapter) (rate(a_bucket{x=~"$x", y!="}"}'
        "[$__rate_interval]))) / on (instance) group_left () b_total + c:d offset 5m"
    )
    assert q.metrics == {"a_bucket", "b_total", "c:d"}
    assert q.matcher_labels == {"a_bucket": {"x", "y"}}
    assert q.grouping_labels == {"le", "adapter", "instance"}
    assert q.functions == {"histogram_quantile", "sum", "rate"}
