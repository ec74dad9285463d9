"""The Python client's and the CLI's experiment calls against the real app (fake engine):
feedback as a tenant and as the operator, the report as JSON and as rich tables."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from anyio.from_thread import start_blocking_portal
from typer.testing import CliRunner

from clients import (
    AsyncClient,
    BadRequestError,
    Client,
    ExposureInfo,
    FeedbackInfo,
    NotFoundError,
)
from server.app import create_app
from server.cli_experiments import make_experiments_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine

ADMIN_KEY = "admin-s3cret"
URL = "http://testserver"
HI = [{"role": "user", "content": "hi"}]


class PortalTransport(httpx.BaseTransport):
    """A sync httpx transport into the ASGI app, on the portal's event loop (as in
    test_client.py: the client under test must see real httpx objects)."""

    def __init__(self, app: Any, portal: Any) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        response: httpx.Response = self._portal.call(call)
        return response


@pytest.fixture
def transport(tmp_path: Path) -> Iterator[httpx.BaseTransport]:
    root = tmp_path / "allowed"
    root.mkdir()
    app = create_app(
        Settings(
            served_model_name="tiny",
            model=make_base(tmp_path / "base"),
            home=tmp_path / "home",
            admin_key=ADMIN_KEY,
            allowed_roots=[root],
        ),
        engine=FakeEngine(),
    )
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        transport = PortalTransport(app, portal)
        with Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
            for i, name in enumerate(("pirate", "formal")):
                path = make_adapter(root / name, seed=i + 1)
                admin.register_adapter(name, str(path), shared=True)
            admin.set_alias("bot", {"pirate@1": 1, "formal@1": 1}, shared=True)
            admin.put_tenant("acme")
        yield transport


def keys(typed_dict: Any) -> set[str]:
    return set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)


def test_client_feedback_exposure_and_report(transport: httpx.BaseTransport) -> None:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
        key = admin.create_key("acme")["key"]
        with (
            Client(URL, api_key=key, transport=transport) as acme,
            Client(URL, api_key=admin.create_key("acme")["key"], transport=transport) as same,
        ):
            reply = acme.chat("bot", HI, max_tokens=4, user="ann")
            rid = reply.body["id"]
            got = acme.feedback(rid, label=True, metric="thumbs")
            assert set(got) == keys(FeedbackInfo)
            assert (got["variant"], got["label"]) == (reply.served_by.alias_variant, 1)
            assert same.feedback(rid, score=2.5)["score"] == 2.5  # another key, same tenant
            by_request = acme.feedback(request_id=reply.served_by.request_id, label="negative")
            assert by_request["response_id"] == rid and by_request["label"] == 0
            exposure = acme.exposure(rid)
            assert set(exposure) == keys(ExposureInfo)
            assert exposure["variant"] == reply.served_by.alias_variant
            with pytest.raises(NotFoundError) as missing:
                acme.feedback("chatcmpl-nope", label=1)
            assert missing.value.code == "response_not_found"
            with pytest.raises(BadRequestError):
                acme.feedback(rid)  # no outcome
        report = admin.experiment_report("bot", since=0, control="formal@1")
        assert report["control"] == "formal@1" and report["exposures"] == 1
        assert set(report["metrics"]) == {"default", "thumbs"}


async def test_async_client_feedback(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    app = create_app(
        Settings(
            served_model_name="tiny",
            model=make_base(tmp_path / "base"),
            home=tmp_path / "home",
            admin_key=ADMIN_KEY,
            allowed_roots=[root],
        ),
        engine=FakeEngine(),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
            await admin.register_adapter("pirate", str(make_adapter(root / "p", seed=1)))
            await admin.set_alias("bot", {"pirate@1": 1})
            async with AsyncClient(URL, api_key=ADMIN_KEY, transport=transport) as operator:
                reply = await operator.chat("bot", HI, max_tokens=2)
                got = await operator.feedback(reply.body["id"], label=0)
                assert got["label"] == 0
            report = await admin.experiment_report("bot")
            assert report["variants"][0]["exposures"] == 1


runner = CliRunner()


@pytest.fixture
def cli(transport: httpx.BaseTransport) -> Callable[..., Any]:
    def connect(url: str, admin_key: str | None) -> Client:
        return Client(url, admin_key=admin_key, transport=transport, sleep=lambda _: None)

    app = typer.Typer()
    app.add_typer(make_experiments_app(connect), name="experiments")
    env = {"LORASWAP_URL": URL, "LORASWAP_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "250"}

    def run(*args: str, code: int = 0) -> Any:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return run


def test_cli_feedback_and_report(cli: Callable[..., Any], transport: httpx.BaseTransport) -> None:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
        key = admin.create_key("acme")["key"]
        with Client(URL, api_key=key, transport=transport) as acme:
            ids: dict[str | None, list[str]] = {}
            for i in range(30):
                reply = acme.chat("bot", HI, max_tokens=2, user=f"user-{i}")
                ids.setdefault(reply.served_by.alias_variant, []).append(reply.body["id"])
    for variant, responses in ids.items():
        for rid in responses:
            label = "positive" if variant == "formal@1" else "0"
            out = cli("experiments", "feedback", rid, "--label", label, "--api-key", key).stdout
            assert out.startswith(f"{rid} (bot: {variant}): default = label ")
    # as the operator (no --api-key: the admin key), another metric, a score
    out = cli("experiments", "feedback", ids["pirate@1"][0], "--score", "3", "--metric", "csat")
    assert "csat = score 3.0" in out.stdout
    table = cli("experiments", "report", "bot").stdout
    assert "pirate@1 (control)" in table and "formal@1" in table
    assert "default (label)" in table and "csat (score)" in table
    assert "sample ratio: ok" in table
    as_json = json.loads(cli("experiments", "report", "bot", "--json").stdout)
    assert as_json["exposures"] == 30
    err = cli("experiments", "feedback", "chatcmpl-nope", "--label", "1", code=1).stderr
    assert "(response_not_found)" in err
    err = cli("experiments", "report", "bot", "--control", "nobody", code=1).stderr
    assert err.startswith("error: ")


def test_client_and_cli_guardrails(cli: Callable[..., Any], transport: httpx.BaseTransport) -> None:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
        got = admin.set_guardrails("bot", min_exposures=5, max_error_rate=0.1)
        assert got["limits"]["max_error_rate"] == 0.1 and got["events"] == []
        assert admin.get_guardrails("bot")["limits"]["min_exposures"] == 5
        assert admin.delete_guardrails("bot")["limits"] is None
        with pytest.raises(NotFoundError):
            admin.get_guardrails("bot")
    out = cli("experiments", "guardrails", "bot", "--max-error-rate", "0.2", "--min-exposures", "9")
    assert out.stdout.strip() == "bot: min_exposures=9, max_error_rate=0.2"
    shown = cli("experiments", "guardrails", "bot", "--json").stdout
    assert json.loads(shown)["limits"]["min_exposures"] == 9
    assert cli("experiments", "guardrails", "bot", "--clear").stdout.strip() == "bot: no guardrails"
    cli("experiments", "guardrails", "bot", code=1)  # none left: 404


def test_the_loraswap_command_has_the_experiments_group() -> None:
    from server.cli import app

    shown = runner.invoke(app, ["experiments", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.stdout
    assert all(command in shown.stdout for command in ("feedback", "report", "guardrails"))


def test_client_and_cli_ramps(cli: Callable[..., Any], transport: httpx.BaseTransport) -> None:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
        got = admin.set_ramp("bot", "formal@1", [10, 50, 100], every_exposures=1000)
        assert (got["percent"], got["state"]) == (10, "running")
        assert admin.get_alias("bot")["variants"] == {"pirate@1": 9000, "formal@1": 1000}
        assert admin.get_ramp("bot")["step"] == 0
        assert admin.delete_ramp("bot")["state"] == "stopped"
    out = cli(
        "experiments",
        "ramp",
        "bot",
        "--candidate",
        "formal@1",
        "--steps",
        "5,25,100",
        "--every-s",
        "600",
    )
    assert out.stdout.strip() == "bot: formal@1 at 5% (step 1 of 3: 5%, 25%, 100%); running"
    assert "at 5%" in cli("experiments", "ramp", "bot").stdout
    assert cli("experiments", "ramp", "bot", "--stop").stdout.strip().endswith("; stopped")
    cli("experiments", "ramp", "bot", code=1)  # none left: 404
    cli("experiments", "ramp", "bot", "--candidate", "formal@1", "--steps", "x", code=2)


def test_client_and_cli_shadow(cli: Callable[..., Any], transport: httpx.BaseTransport) -> None:
    with Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin:
        got = admin.set_shadow("bot", "formal@1", 1.0)
        assert got == {"alias": "bot", "adapter": "formal@1", "fraction": 1.0}
        assert admin.get_shadow("bot")["adapter"] == "formal@1"
        with Client(URL, api_key=admin.create_key("acme")["key"], transport=transport) as acme:
            reply = acme.chat("bot", HI, max_tokens=4, user="ann", temperature=0)
            assert reply.body["choices"][0]["message"]["content"]
        assert admin.delete_shadow("bot")["adapter"] == "formal@1"
        with pytest.raises(NotFoundError):
            admin.get_shadow("bot")
        with pytest.raises(BadRequestError):
            admin.set_shadow("bot", "formal@1", 2.0)
        app: Any = transport._asgi.app  # type: ignore[attr-defined]
        transport._portal.call(app.state.shadows.settle)  # type: ignore[attr-defined]
        report = admin.experiment_report("bot")
        (summary,) = report["shadow"]
        assert (summary["shadow"], summary["sampled"]) == ("formal@1", 1)
    out = cli("experiments", "shadow", "bot", "--adapter", "pirate", "--fraction", "0.25")
    assert out.stdout.strip() == "bot: shadow pirate on 25% of requests"
    assert json.loads(cli("experiments", "shadow", "bot", "--json").stdout)["fraction"] == 0.25
    shown = cli("experiments", "report", "bot").stdout
    assert "shadow traffic" in shown and "formal@1" in shown
    assert cli("experiments", "shadow", "bot", "--clear").stdout.strip().endswith("; stopped")
    cli("experiments", "shadow", "bot", code=1)  # none left: 404
    cli("experiments", "shadow", "bot", "--adapter", "pirate", code=2)  # no fraction
