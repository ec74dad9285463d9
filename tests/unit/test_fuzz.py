"""Property-based fuzzing of the whole HTTP API, generated from its OpenAPI schema.

Schemathesis turns every operation of `app.openapi()` into Hypothesis strategies, valid
(positive) and schema-violating (negative) requests alike, and each one is sent in-process
to the REAL app (`create_app(settings, engine=FakeEngine())`) through schemathesis' ASGI
transport. The registry is seeded first (an adapter with two versions, a pinned second
one, a catalog adapter, an alias, a tenant with quotas and an API key) and re-seeded before
each operation. Part of the time, path parameters and body fields are steered to what the
registry holds, and at most one field per request to an edge value (2**63, NUL bytes, bad
URLs, hostile safetensors files...; see tests/fuzz_support.py), so fuzzing reaches the
handlers' deep code paths, not only their 404s. Most requests carry the admin key; the
others a tenant key, a wrong key, a malformed header or none.

test_fuzz_open_server fuzzes every operation of a second server configured with no key at
all (open mode), with no key, an unknown one, or a proxy header. test_edge_values sends,
besides, every edge value of every field of every operation once, in an otherwise valid
request: deterministic, so CI always covers those.

Every response must satisfy:
- no 5xx, nor an exception raised out of the app (a real server answers those with 500),
  nor a server_error frame in an SSE stream. A 503 `engine_unavailable`/`server_overloaded`
  would be legitimate, though the fake engine is healthy and never causes one;
- every error (status >= 400) is JSON in OpenAI's shape
  `{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`;
- a JSON 2xx body parses; an SSE stream ends with `data: [DONE]`, every frame JSON;
- every response carries `x-request-id`;
- an answer within TIMEOUT_S (10 s): a hang fails the test.
Conformance to the documented status codes is NOT checked (FastAPI documents only 200/422).

Nothing leaves the machine: `urllib.request.urlopen` is replaced, for this module only, by
one that refuses, so the registry's real URL parsing and error handling still run.

LORASWAP_FUZZ_EXAMPLES is the number of generated requests, spread evenly over the
operations (default 1,000, about 20 s with the edge sweep: the CI run; test_totals checks
that at least 1,000 went out, with and without keys). The long run, more requests with
fresh random inputs, collecting every distinct failure instead of stopping at
the first, and writing a JSON summary (status histogram per operation, most frequent error
messages, failures with a request that shows each):

    LORASWAP_FUZZ_EXAMPLES=3000 LORASWAP_FUZZ_SEED=random LORASWAP_FUZZ_KEEP_GOING=1 \\
    LORASWAP_FUZZ_REPORT=/tmp/fuzz-report.json .venv/bin/python -m pytest \\
        tests/unit/test_fuzz.py -q -p no:cacheprovider --basetemp=/tmp/fuzz

LORASWAP_FUZZ_SEED: unset = derandomized (the same requests at every run of the same code,
so CI is stable); an integer = that seed (to replay a run); `random` = new inputs each run.
LORASWAP_FUZZ_KEEP_GOING=1: record every distinct failure (by operation, status and
problem) with one request each, and fail each operation at its end; otherwise the first
failure fails at once and Hypothesis shrinks it to a minimal request.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi as st_asgi

from server.app import create_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine
from tests.fuzz_support import BASE, FRESH, MODELS, Pools, path_pools, pools

KEY = "fuzz-admin-key"
ADMIN = {"authorization": f"Bearer {KEY}"}
TIMEOUT_S = 10.0
TOTAL_EXAMPLES = int(os.environ.get("LORASWAP_FUZZ_EXAMPLES", "1000"))
SEED = os.environ.get("LORASWAP_FUZZ_SEED", "")
REPORT = os.environ.get("LORASWAP_FUZZ_REPORT", "")
KEEP_GOING = os.environ.get("LORASWAP_FUZZ_KEEP_GOING", "") == "1"
# 503s that mean "retry later", not a bug: legitimate, though the fake engine never gives them.
RETRYABLE_503 = {"engine_unavailable", "server_overloaded"}
ERROR_KEYS = {"message", "type", "param", "code"}


def _operations() -> dict[str, tuple[str | None, set[str]]]:
    """`METHOD /path` of every operation -> the media type and top-level fields of its
    request body, read from the schema of an app never started."""
    settings = Settings(served_model_name=BASE, model=Path("/nonexistent"))
    openapi = create_app(settings, engine=FakeEngine()).openapi()
    components: dict[str, Any] = openapi.get("components", {}).get("schemas", {})
    out = {}
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            # FastAPI declares one media type per body: JSON or multipart form.
            content: dict[str, Any] = op.get("requestBody", {}).get("content", {})
            media_type = next(iter(content), None)
            ref = content[media_type].get("schema", {}).get("$ref", "") if media_type else ""
            fields = set(components.get(ref.rpartition("/")[2], {}).get("properties", {}))
            out[f"{method.upper()} {path}"] = (media_type, fields)
    return out


BODIES = _operations()
OPERATIONS = list(BODIES)
PER_OPERATION = max(1, math.ceil(TOTAL_EXAMPLES / len(OPERATIONS)))


@dataclass
class Stats:
    """What was sent and what came back; written to LORASWAP_FUZZ_REPORT at the end."""

    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    # (operation, status, error message) -> how often: what stops requests short
    errors: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    # (operation, status, problem) -> the shortest request that showed it
    failures: dict[tuple[str, int, str], str] = field(default_factory=dict)
    slowest_s: float = 0.0
    # generated requests by credentials sent: admin, tenant, wrong, none
    auth: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def record(self, label: str, status: int, elapsed_s: float, error: str = "") -> None:
        if error:
            self.errors[(label, status, _signature(error))] += 1
        self.statuses[status] += 1
        self.by_operation.setdefault(label, Counter())[status] += 1
        self.slowest_s = max(self.slowest_s, elapsed_s)

    def fail(self, label: str, status: int, problem: str, request: str) -> None:
        key = (label, status, _signature(problem))
        if key not in self.failures or len(request) < len(self.failures[key]):
            self.failures[key] = request

    def failures_of(self, label: str) -> list[str]:
        return [
            f"{status} {problem}\n  {request}"
            for (op, status, problem), request in self.failures.items()
            if op == label
        ]

    def summary(self) -> dict[str, Any]:
        edges = sum(sum(v.values()) for k, v in self.by_operation.items() if "[edges]" in k)
        return {
            "requests": sum(self.statuses.values()),
            "requests_fuzz": sum(self.statuses.values()) - edges,
            "requests_edges": edges,
            "statuses": dict(sorted(self.statuses.items())),
            "by_operation": {k: dict(sorted(v.items())) for k, v in self.by_operation.items()},
            "top_errors": {
                op: [f"{n}x {status} {message}" for (_, status, message), n in top[:8]]
                for op in self.by_operation
                if (top := [i for i in self.errors.most_common() if i[0][0] == op])
            },
            "failures": [
                {"operation": op, "status": status, "problem": problem, "request": request}
                for (op, status, problem), request in self.failures.items()
            ],
            "auth": dict(self.auth),
            "slowest_s": round(self.slowest_s, 3),
            "wall_s": round(time.monotonic() - self.started, 1),
            "examples_per_operation": PER_OPERATION,
            "seed": SEED or "derandomized",
        }


def _signature(text: str) -> str:
    # Digits vary between examples of one bug (sizes, ids): not part of its signature.
    return re.sub(r"\d+", "N", text)[:120]


@dataclass
class Fuzz:
    app: Any
    schema: schemathesis.BaseSchema
    root: Path
    stats: Stats
    tenant_key: str = ""
    tenant_key_id: str = ""
    key_ids: list[str] = field(default_factory=list)
    fresh: int = 0

    def admin(self, method: str, path: str, body: Any = None) -> requests.Response:
        with st_asgi.get_client(self.app) as client:
            r = client.request(method, path, json=body, headers=ADMIN, timeout=TIMEOUT_S)
        assert r.status_code < 500, f"seeding: {method} {path} -> {r.status_code} {r.text}"
        return r

    def seed(self) -> None:
        """(Re)create what the fuzzer deleted. Best effort: the fuzzer may have made some
        of it impossible (e.g. an adapter now named `ab`), which is fine."""
        allowed = self.root / "allowed"
        for name, versions in (("pirate", ("pirate-1", "pirate-2")), ("formal", ("formal-3",))):
            if self.admin("GET", f"/admin/adapters/{name}").status_code == 404:
                first, *rest = (str(allowed / v) for v in versions)
                self.admin("POST", "/admin/adapters", {"name": name, "source": first})
                for source in rest:
                    self.admin("POST", f"/admin/adapters/{name}/versions", {"source": source})
            self.admin("PUT", f"/admin/adapters/{name}/access", {"shared": True})
        self.admin("PUT", "/admin/adapters/formal/pin", {"pinned": True})
        self.admin("PUT", "/admin/aliases/ab", {"variants": {"pirate@1": 1, "formal": 1}})
        quotas = {"max_concurrent": 8, "tokens_per_minute": 10**6}
        self.admin("PUT", "/admin/tenants/acme", quotas)
        keys: list[str] = self.admin("GET", "/admin/tenants/acme").json()["key_ids"]
        if self.tenant_key_id not in keys:
            r = self.admin("POST", "/admin/tenants/acme/keys")
            assert r.status_code == 201, r.text
            self.tenant_key, self.tenant_key_id = r.json()["key"], r.json()["key_id"]
            keys = [*keys, self.tenant_key_id]
        self.key_ids = keys

    def fresh_name(self) -> str:
        self.fresh += 1
        return f"edge-{self.fresh}"


def _offline(*args: object, **kwargs: object) -> Any:
    raise urllib.error.URLError("network access is disabled in the fuzz tests")


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    root = tmp_path_factory.mktemp("fuzz")
    make_base(root / "base")
    for name, seed in (("pirate-1", 1), ("pirate-2", 2), ("formal-3", 3)):
        make_adapter(root / "allowed" / name, seed=seed)
    make_adapter(root / "catalog" / "casual", seed=4)
    make_adapter(root / "outside" / "evil", seed=5)
    settings = Settings(
        served_model_name=BASE,
        model=root / "base",
        home=root / "home",
        admin_key=KEY,
        allowed_roots=[root / "allowed"],
        adapters_dir=root / "catalog",
    )
    app = create_app(settings, engine=FakeEngine())
    config = schemathesis.Config.from_dict(
        {
            "max-stream-events": 100_000,  # read event streams to their end (default: 20)
            # Reproducers must show every value (the default masks `*token*` fields too).
            "output": {"sanitization": {"enabled": False}},
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(urllib.request, "urlopen", _offline)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
        env = Fuzz(app=app, schema=schema, root=root, stats=Stats())
        try:
            yield env
        finally:
            st_asgi.shutdown_lifespans()  # the app's lifespan exit: closes the registry
            if REPORT:
                Path(REPORT).write_text(json.dumps(env.stats.summary(), indent=1) + "\n")


def _headers(fuzz: Fuzz) -> st.SearchStrategy[dict[str, str]]:
    """Mostly the admin key (past auth, into the handlers); else a tenant's, a wrong one, none."""
    others = ["", f"Bearer {fuzz.tenant_key}", "Bearer nope", "Basic x", "Bearer "]
    auth = st.integers(0, 9).flatmap(
        lambda i: st.just(f"Bearer {KEY}") if i < 6 else st.sampled_from(others)
    )
    extra = st.sampled_from(
        [
            {},
            {"x-request-id": "fuzz-1"},
            {"x-request-id": "bad id"},
            {"x-user-id": "u1"},
            {"x-forwarded-for": "203.0.113.9"},  # relayed: open mode must not apply
        ]
    )
    return st.builds(lambda a, e: {**({"authorization": a} if a else {}), **e}, auth, extra)


def _settings() -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=PER_OPERATION,
        deadline=None,  # hangs are caught by the transport's TIMEOUT_S instead
        database=None,  # no example database written into the work tree
        derandomize=not SEED,
        # Schemathesis' strategies are large and filter much (negative mode): these health
        # checks judge the strategies' shape, not the app under test.
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        print_blob=False,
    )


def _path_pools(path: str, key_ids: list[str]) -> Pools:
    """tests/fuzz_support.py's path parameters, and `{model}` (GET /v1/models/{model})."""
    params = path_pools(path, key_ids)
    if "{model}" in path:
        params.valid["model"] = list(MODELS)
        edge = ["nope", f"{BASE}:nope", f"{BASE}:", ":pirate", "pirate@1", "acme", "a/b/../c"]
        params.edge["model"] = [*edge, "x" * 300, "\u00e9t\u00e9"]
    return params


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_operation(label: str, fuzz: Fuzz) -> None:
    method, path = label.split(" ", 1)
    operation = fuzz.schema[path][method]
    fuzz.seed()
    params = _path_pools(path, fuzz.key_ids)
    plain = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in params.valid.items()})
    named = plain
    if params.edge:
        # At most one path parameter with an edge value.
        named = st.one_of(
            plain,
            st.sampled_from(sorted(params.edge)).flatmap(
                lambda k: plain.flatmap(
                    lambda d: st.sampled_from(params.edge[k]).map(lambda v: {**d, k: v})
                )
            ),
        )

    def generated(mode: GenerationMode, steer: bool) -> st.SearchStrategy[schemathesis.Case[Any]]:
        if not steer:
            return operation.as_strategy(generation_mode=mode)
        return named.flatmap(
            lambda named: operation.as_strategy(generation_mode=mode, path_parameters=named)
        )

    positive, negative = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
    # one_of picks a branch uniformly: 3/5 valid requests, 3/5 with the registry's names.
    cases = st.one_of(
        generated(positive, True),
        generated(positive, True),
        generated(positive, False),
        generated(negative, True),
        generated(negative, False),
    )
    values = pools(fuzz.root, fuzz.key_ids)
    fresh = st.integers(0, 10**9).map(lambda i: f"fuzz-{i}")
    steerable = sorted(BODIES[label][1] & set(values.valid))
    breakable = sorted(BODIES[label][1] & set(values.edge))

    @_settings()
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(cases, label="case")
        if isinstance(case.body, dict):
            # A copy: the drawn body may be an object Hypothesis hands out again (st.just),
            # and editing it in place would make generation inconsistent (flaky).
            body = copy.deepcopy(case.body)
            # Most fields from the valid pools (3 in 4), so requests get past validation;
            # then at most one field gets an edge value, so a failure names its cause.
            for key in steerable:
                if data.draw(st.integers(0, 3), label=f"steer {key}"):
                    body[key] = data.draw(st.sampled_from(values.valid[key]), label=key)
                    if body[key] == FRESH:
                        body[key] = data.draw(fresh, label=key)
            edge = (
                data.draw(st.one_of(st.none(), st.sampled_from(breakable))) if breakable else None
            )
            if edge is not None:
                body[edge] = data.draw(st.sampled_from(values.edge[edge]), label=f"edge {edge}")
            case.body = _for_media_type(case, body)
        headers = data.draw(_headers(fuzz), label="headers")
        _check(fuzz, label, case, headers)

    if SEED and SEED != "random":
        run = hypothesis.seed(int(SEED))(run)
    run()
    found = fuzz.stats.failures_of(label)
    assert not found, f"{label}: {len(found)} distinct failures:\n" + "\n".join(found)


@pytest.mark.parametrize("label", OPERATIONS)
def test_edge_values(label: str, fuzz: Fuzz) -> None:
    """Each edge value of each body field and path parameter, once, in a request that is
    valid otherwise (the plainest valid value of every other known field)."""
    method, path = label.split(" ", 1)
    operation = fuzz.schema[path][method]
    fuzz.seed()
    values = pools(fuzz.root, fuzz.key_ids)
    params = _path_pools(path, fuzz.key_ids)
    media_type, fields = BODIES[label]
    plain_params = {k: v[0] for k, v in params.valid.items()}
    plain_body = {k: values.valid[k][0] for k in sorted(fields & set(values.valid))}
    variants: list[tuple[dict[str, Any], dict[str, Any]]] = [(plain_params, plain_body)]
    variants += [({**plain_params, k: v}, plain_body) for k, vs in params.edge.items() for v in vs]
    variants += [
        (plain_params, {**plain_body, k: v})
        for k in sorted(fields & set(values.edge))
        for v in values.edge[k]
    ]
    for path_parameters, body in variants:
        case = operation.Case(path_parameters=path_parameters)
        if media_type is not None:
            case = operation.Case(
                path_parameters=path_parameters,
                body={k: fuzz.fresh_name() if v == FRESH else v for k, v in body.items()},
                media_type=media_type,
            )
            case.body = _for_media_type(case, case.body)
        _check(fuzz, f"{label} [edges]", case, ADMIN, keep_going=True)
    found = fuzz.stats.failures_of(f"{label} [edges]")
    assert not found, f"{label}: {len(found)} distinct failures:\n" + "\n".join(found)


def _for_media_type(case: schemathesis.Case[Any], body: Any) -> Any:
    if (case.media_type or "").startswith("multipart/") and isinstance(body, dict):
        return {k: v for k, v in body.items() if v is not None}  # else sent as "null"
    return body


def _check(
    fuzz: Fuzz,
    label: str,
    case: schemathesis.Case[Any],
    headers: dict[str, str],
    *,
    keep_going: bool = KEEP_GOING,
) -> None:
    """Send `case`; record it; check the response. A failure raises at once unless
    `keep_going`, when it is recorded, to be reported at the end of the test."""
    request = _reproducer(case, headers)
    if "[edges]" not in label:
        fuzz.stats.auth[_credentials(fuzz, headers)] += 1
    try:
        response = case.call(headers=dict(headers), timeout=TIMEOUT_S)  # call() adds to it
    except requests.exceptions.Timeout:
        status, problems = 0, [f"no answer within {TIMEOUT_S} s (a hang)"]
        fuzz.stats.record(label, status, TIMEOUT_S)
    except Exception as exc:
        # Raised out of the app: Starlette has already answered 500 to the client.
        status, problems = 500, [f"unhandled {type(exc).__name__}: {exc}"]
        fuzz.stats.record(label, status, 0.0)
        if not keep_going:
            raise AssertionError(f"{label} -> {problems[0]}\nrequest: {request}") from exc
    else:
        fuzz.stats.record(label, response.status_code, response.elapsed, _message(response))
        status, problems = response.status_code, _problems(response)
        request += f"\nresponse: {response.content[:500]!r}"
    for problem in problems:
        fuzz.stats.fail(label, status, problem, request)
    assert keep_going or not problems, (
        f"{label} -> {status}: {'; '.join(problems)}\nrequest: {request}"
    )


def _reproducer(case: schemathesis.Case[Any], headers: dict[str, str]) -> str:
    try:
        request = case.as_curl_command(headers)
    except Exception:  # best effort: rendering binary multipart bodies may fail
        request = f"{case.method} {case.formatted_path} body={case.body!r}"
    if len(request) > 2000:
        request = f"{request[:1500]} ...[{len(request) - 1800} chars]... {request[-300:]}"
    return f"{request}\nheaders: {headers}"


def _message(response: schemathesis.Response) -> str:
    if response.status_code < 400:
        return ""
    try:
        return str(json.loads(response.content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "?"


def _problems(response: schemathesis.Response) -> list[str]:
    problems = []
    status = response.status_code
    content_type = (response.headers.get("content-type") or [""])[0]
    if "x-request-id" not in response.headers:
        problems.append("no x-request-id header")
    if content_type.startswith("text/event-stream"):
        return problems + _stream_problems(response)
    if status < 400 and not content_type.startswith("application/json"):
        return problems  # e.g. /metrics: Prometheus' text format
    try:
        body = json.loads(response.content)
    except ValueError:
        return [*problems, f"body is not JSON (content-type {content_type!r})"]
    if status >= 400:
        if not content_type.startswith("application/json"):
            problems.append(f"error with content-type {content_type!r}")
        problems += _error_shape(body)
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        if status >= 500 and not (status == 503 and code in RETRYABLE_503):
            problems.append(f"server error {status}")
    return problems


def _error_shape(body: Any) -> list[str]:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return ["error body is not {'error': {...}}"]
    error = body["error"]
    if set(error) != ERROR_KEYS:
        return [f"error keys are {sorted(error)}, not {sorted(ERROR_KEYS)}"]
    bad = [k for k in ("message", "type") if not isinstance(error[k], str) or not error[k]]
    bad += [k for k in ("param", "code") if error[k] is not None and not isinstance(error[k], str)]
    return [f"error.{k} is empty or of a wrong type: {error[k]!r}" for k in bad]


def _stream_problems(response: schemathesis.Response) -> list[str]:
    if response.status_code != 200:
        return [f"event stream with status {response.status_code}"]
    frames = [
        line.removeprefix("data: ")
        for line in response.content.decode().splitlines()
        if line.startswith("data: ")
    ]
    problems = []
    if not response.stream_cut_short and frames[-1:] != ["[DONE]"]:
        problems.append("stream does not end with 'data: [DONE]'")
    for frame in frames:
        if frame == "[DONE]":
            continue
        try:
            event = json.loads(frame)
        except ValueError:
            problems.append(f"SSE frame is not JSON: {frame[:200]!r}")
            continue
        if isinstance(event, dict) and "error" in event:
            problems += _error_shape(event)
            if isinstance(event["error"], dict) and event["error"].get("type") == "server_error":
                problems.append(f"server_error frame in the stream: {frame[:300]}")
    return problems


def _credentials(fuzz: Fuzz, headers: dict[str, str]) -> str:
    given = headers.get("authorization", "")
    if not given:
        return "none"
    if given == f"Bearer {KEY}":
        return "admin"
    return "tenant" if given == f"Bearer {fuzz.tenant_key}" else "wrong"


@pytest.fixture(scope="module")
def open_fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """A server configured with no key at all (open mode on loopback, admin API disabled):
    the other half of "with and without keys"."""
    root = tmp_path_factory.mktemp("fuzz-open")
    make_base(root / "base")
    make_adapter(root / "catalog" / "casual", seed=4)
    settings = Settings(
        served_model_name=BASE,
        model=root / "base",
        home=root / "home",
        adapters_dir=root / "catalog",
    )
    app = create_app(settings, engine=FakeEngine())
    config = schemathesis.Config.from_dict({"max-stream-events": 100_000})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(urllib.request, "urlopen", _offline)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
        yield Fuzz(app=app, schema=schema, root=root, stats=Stats())


OPEN_EXAMPLES = max(1, PER_OPERATION // 3)


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_open_server(label: str, open_fuzz: Fuzz) -> None:
    """Every operation of a server without keys, with no key, a key it does not know, or
    relayed by a proxy (which open mode must refuse): no 5xx, no hang, OpenAI-shaped errors."""
    method, path = label.split(" ", 1)
    operation = open_fuzz.schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    headers = st.sampled_from(
        [{}, {"authorization": "Bearer nope"}, {"x-forwarded-for": "203.0.113.9"}]
    )

    @hypothesis.settings(_settings(), max_examples=OPEN_EXAMPLES)
    @given(case=cases, headers=headers)
    def run(case: schemathesis.Case[Any], headers: dict[str, str]) -> None:
        _check(open_fuzz, f"{label} [open]", case, headers)

    if SEED and SEED != "random":
        run = hypothesis.seed(int(SEED))(run)
    run()
    found = open_fuzz.stats.failures_of(f"{label} [open]")
    assert not found, f"{label}: {len(found)} distinct failures:\n" + "\n".join(found)


def test_totals(fuzz: Fuzz) -> None:
    """The whole module ran at least 1,000 generated requests (the issue's bar), over every
    operation, with the admin key, a tenant key, wrong credentials and none."""
    if set(fuzz.stats.by_operation) < set(OPERATIONS) or TOTAL_EXAMPLES < 1000:
        pytest.skip("totals are checked when the whole module runs with >= 1,000 examples")
    assert sum(fuzz.stats.auth.values()) >= 1000, fuzz.stats.auth
    assert all(fuzz.stats.auth[kind] >= 20 for kind in ("admin", "tenant", "wrong", "none")), (
        fuzz.stats.auth
    )
