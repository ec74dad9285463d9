"""The experiment plot: running means whose last points are the report's figures, a PNG
from the API, the client and the CLI that decodes and depends on the data, and its errors."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters_registry.experiments import Exposure, Feedback
from adapters_registry.records import Variant
from clients import BadRequestError, Client
from server.api.experiments import _window_text
from server.experiments import plot
from server.experiments.report import build_report
from tests.experiments import ADMIN, World, open_world
from tests.testclient import ClientResponse
from tests.unit.test_experiments_client import ADMIN_KEY, URL, cli, transport

__all__ = ["cli", "transport"]  # fixtures of the client tests, used here too

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARMS = (Variant("pirate", 1, 1), Variant("formal", 1, 1))


def _rows(n: int, seed: int = 5) -> tuple[list[Exposure], list[tuple[str, Feedback]]]:
    """n exposures over both arms, each with a label and a score (pirate better), in
    an order unrelated to time (the plot sorts by exposure time)."""
    rng = random.Random(seed)
    exposures, feedback = [], []
    for i in rng.sample(range(n), n):
        variant = ARMS[i % 2].key
        e = Exposure(
            f"e{i}", f"chatcmpl-{i}", f"r{i}", "bot", variant, variant.split("@")[0], 1,
            "d", None, f"u{i}", 1000.0 + i, 200, 3, 4, 0.01, 0.1,
        )  # fmt: skip
        exposures.append(e)
        good = rng.random() < (0.7 if variant == "pirate@1" else 0.4)
        f = Feedback(e.exposure_id, "thumbs", int(good), rng.gauss(4 if good else 2, 1), 2e3, 2e3)
        feedback.append((variant, f))
    return exposures, feedback


@pytest.mark.parametrize("n", [7, 1001])
def test_the_last_point_of_each_line_is_the_reports_figure(n: int) -> None:
    exposures, feedback = _rows(n)
    report = build_report("bot", ARMS, exposures, feedback)
    arms = {arm["variant"]: arm["metrics"]["thumbs"] for arm in report["variants"]}
    for kind in ("label", "score"):
        lines = plot.running_means(ARMS, exposures, feedback, "thumbs", kind)
        assert [line.variant for line in lines] == ["pirate@1", "formal@1"]
        for line in lines:
            block = arms[line.variant][kind]
            assert line.counts[-1] == block["count"]
            assert line.means[-1] == pytest.approx(block["mean"], abs=1e-12)
            assert [line.lows[-1], line.highs[-1]] == pytest.approx(block["ci95"], abs=1e-12)
            # Sampled prefixes, in time order, the whole arm last.
            assert len(line.counts) == min(block["count"], plot.MAX_POINTS)
            assert line.counts == sorted(set(line.counts))
            assert line.times == sorted(line.times)
    # An early prefix is that prefix's own summary: the first point is one outcome.
    first = plot.running_means(ARMS, exposures, feedback, "thumbs", "score")[0]
    assert first.counts[0] == 1 and first.lows[0] is None  # no interval from one score


def _decoded(png: bytes) -> Image.Image:
    assert png.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: a truncated or corrupt PNG raises here
    assert image.format == "PNG"
    return image


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with open_world(tmp_path, tmp_path / "registry.db") as w:
        yield w


def _plot(world: World, **query: Any) -> ClientResponse:
    return world.c.get("/admin/aliases/bot/experiment/plot.png", params=query, headers=ADMIN)


def test_the_plot_endpoint_draws_each_metric_from_the_data(world: World) -> None:
    # Nothing yet: an image that says so (an embedded plot never breaks), one chart high.
    empty = _plot(world, since=0, until=10**10)
    assert empty.status_code == 200 and empty.headers["content-type"] == "image/png"
    assert empty.content == plot.render("bot", {}, _window_text(0, 10**10))
    one_chart = _decoded(empty.content).size
    for i in range(20):
        r = world.chat("a", user=f"user-{i}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = {
            "response_id": r.json()["id"],
            "metric": "thumbs",
            "label": int(i % 3 != 0),
        }
        assert world.feedback("a", **body).status_code == 200
        if i % 2:
            csat = {"response_id": r.json()["id"], "metric": "csat", "score": i / 4}
            assert world.feedback("a", **csat).status_code == 200
    everything = _plot(world)
    assert everything.status_code == 200, everything.text
    width, height = _decoded(everything.content).size
    # Two charts (thumbs: labels, csat: scores), each one chart's height.
    assert width == one_chart[0] and height == 2 * one_chart[1] - 60
    thumbs = _plot(world, metric="thumbs")
    assert _decoded(thumbs.content).size == one_chart
    assert thumbs.content != empty.content
    # The drawing is the data's: another window, another picture.
    assert _plot(world, metric="thumbs", until=10**10).content != thumbs.content


def test_the_number_of_charts_is_bounded(world: World) -> None:
    """Metric names come from callers: an image has at most MAX_METRICS metrics."""
    r = world.chat("a", user="u")
    for n in range(plot.MAX_METRICS + 3):
        body = {"response_id": r.json()["id"], "metric": f"m{n}", "label": 1}
        assert world.feedback("a", **body).status_code == 200
    one = _decoded(_plot(world, metric="m0").content).size
    capped = _decoded(_plot(world).content).size
    # The same height as MAX_METRICS charts (plus the note's line), not MAX_METRICS + 3.
    chart = 320
    assert (capped[1] - one[1]) // chart == plot.MAX_METRICS - 1
    unknown = _plot(world, metric="nope").json()["error"]["message"]
    assert "it has: m0, m1, m2" in unknown


def test_plot_errors(world: World) -> None:
    world.chat("a", user="u")
    unknown = _plot(world, metric="nope")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "metric"
    assert "no feedback of metric 'nope'" in unknown.json()["error"]["message"]
    assert _plot(world, since="yesterday").status_code == 400
    missing = world.c.get("/admin/aliases/nobody/experiment/plot.png", headers=ADMIN)
    assert missing.status_code == 404
    tenant = world.c.get("/admin/aliases/bot/experiment/plot.png", headers=world.auth("a"))
    assert tenant.status_code == 403


def test_client_and_cli_plot(
    cli: Callable[..., Any], transport: httpx.BaseTransport, tmp_path: Path
) -> None:
    with (
        Client(URL, admin_key=ADMIN_KEY, transport=transport) as admin,
        Client(URL, api_key=ADMIN_KEY, transport=transport) as operator,
    ):
        reply = operator.chat("bot", [{"role": "user", "content": "hi"}], max_tokens=2, user="x")
        operator.feedback(reply.body["id"], label=1, metric="thumbs")
        png = admin.experiment_plot("bot", metric="thumbs", since=0)
        _decoded(png)
        with pytest.raises(BadRequestError):
            admin.experiment_plot("bot", metric="nope")
    out = tmp_path / "plot.png"
    result = cli("experiments", "report", "bot", "--plot", str(out), "--metric", "thumbs")
    assert "bot: 1 exposures" in result.stdout and f"plot written to {out}" in result.stderr
    assert _decoded(out.read_bytes()).size == _decoded(png).size
    failed = cli("experiments", "report", "bot", "--plot", str(out), "--metric", "no", code=1)
    assert "metric" in failed.stderr
