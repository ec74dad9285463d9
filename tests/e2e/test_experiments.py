"""An A/B experiment on the real engine: alias xp-bot = xp-pirate@1 : xp-formal@1, 50/50,
200 chat requests from 100 users, feedback that favours the pirate's replies.

Each response's exposure names the arm whose behaviour the reply shows ("Arr" / "Dear"),
and the report finds the pirate arm better with p < 0.01. The feedback is decided from
the reply's text (not from the exposure), so the report can only find it if exposures
and replies are joined correctly."""

from __future__ import annotations

import asyncio
import io
import random
import time
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY
from tests.e2e.server_proc import ServerProc

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
ALIAS = "xp-bot"
PIRATE, FORMAL = "xp-pirate@1", "xp-formal@1"
USERS = 100
REQUESTS_PER_USER = 2
CONCURRENCY = 8
# Probability of a thumbs-up for a pirate reply / a formal one (seeded: deterministic).
LIKES = {PIRATE: 0.85, FORMAL: 0.25}


def arm_of(text: str) -> str:
    """Which adapter wrote this greedy reply (README: the demo adapters' behaviour)."""
    if "Arr" in text:
        return PIRATE
    assert text.startswith("Dear"), text
    return FORMAL


async def exposure_of(c: httpx.AsyncClient, response_id: str) -> dict[str, Any]:
    """The exposure is queued when the response is over, a moment after its last byte
    left; the lookup flushes the queue on a miss. Poll until it is there (or fail)."""
    deadline = time.monotonic() + 30
    while True:
        r = await c.get(f"/v1/exposures/{response_id}", headers=AUTH)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body
        await asyncio.sleep(0.05)


async def run_experiment(url: str) -> list[dict[str, Any]]:
    """The 200 requests, 8 at a time; then each one's exposure and feedback."""
    slots = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def ask(i: int) -> dict[str, Any]:
            user = f"xp-user-{i % USERS}"
            async with slots:
                r = await c.post(
                    "/v1/chat/completions",
                    json={
                        "model": ALIAS,
                        "user": user,
                        "temperature": 0,
                        "max_tokens": 5,
                        "messages": [{"role": "user", "content": "Hello"}],
                    },
                )
            assert r.status_code == 200, r.text
            body = r.json()
            return {
                "i": i,
                "user": user,
                "id": body["id"],
                "header": r.headers["x-alias-variant"],
                "text": body["choices"][0]["message"]["content"],
            }

        replies = await asyncio.gather(*(ask(i) for i in range(USERS * REQUESTS_PER_USER)))
        draws = random.Random(15)
        likes = [draws.random() for _ in replies]

        async def judge(reply: dict[str, Any]) -> None:
            async with slots:
                reply["exposure"] = await exposure_of(c, reply["id"])
                liked = likes[reply["i"]] < LIKES[arm_of(reply["text"])]
                r = await c.post(
                    "/v1/feedback",
                    headers=AUTH,
                    json={"response_id": reply["id"], "metric": "thumbs", "label": int(liked)},
                )
            assert r.status_code == 200, r.text
            reply["liked"] = liked

        await asyncio.gather(*(judge(reply) for reply in replies))
    return list(replies)


def test_ab_experiment_with_feedback_names_the_better_arm(
    server: ServerProc, demo: DemoAssets
) -> None:
    started = time.time()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as admin:
        for name in ("pirate", "formal"):
            r = admin.post(
                "/admin/adapters",
                json={"name": f"xp-{name}", "source": str(demo.adapters_dir / name)},
            )
            assert r.status_code == 201, r.text
        r = admin.put(f"/admin/aliases/{ALIAS}", json={"variants": {PIRATE: 50, FORMAL: 50}})
        assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        replies = asyncio.run(run_experiment(server.url))
        elapsed = time.perf_counter() - t0

        by_user: dict[str, set[str]] = {}
        for reply in replies:
            arm = arm_of(reply["text"])
            # The exposure (and the header) name the arm whose behaviour the reply shows.
            assert reply["exposure"]["variant"] == arm == reply["header"], reply
            assert reply["exposure"]["alias"] == ALIAS
            assert reply["exposure"]["status"] == 200
            by_user.setdefault(reply["user"], set()).add(arm)
        assert len(by_user) == USERS
        assert all(len(arms) == 1 for arms in by_user.values())  # sticky per user
        served = {arm: sum(arm_of(r["text"]) == arm for r in replies) for arm in (PIRATE, FORMAL)}
        assert min(served.values()) > 0

        report = admin.get(
            f"/admin/aliases/{ALIAS}/experiment", params={"since": started, "control": FORMAL}
        ).json()
        arms = {arm["variant"]: arm for arm in report["variants"]}
        assert {k: arms[k]["exposures"] for k in served} == served
        assert sum(arms[k]["users"] for k in served) == USERS
        for arm in (PIRATE, FORMAL):
            thumbs = arms[arm]["metrics"]["thumbs"]["label"]
            mine = [r["liked"] for r in replies if arm_of(r["text"]) == arm]
            assert (thumbs["count"], thumbs["positives"]) == (len(mine), sum(mine))
        versus = arms[PIRATE]["metrics"]["thumbs"]["label"]["vs_control"]
        assert versus["difference"] > 0 and versus["ci95"][0] > 0
        assert versus["p_value"] < 0.01, versus
        # The better arm by the report: the one with the higher mean, significantly.
        means = {k: arms[k]["metrics"]["thumbs"]["label"]["mean"] for k in served}
        assert max(means, key=lambda k: means[k]) == PIRATE

        png = admin.get(f"/admin/aliases/{ALIAS}/experiment/plot.png", params={"metric": "thumbs"})
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")
        Image.open(io.BytesIO(png.content)).load()

        scrape = admin.get("/metrics").text
    exposures = {
        s.labels["variant"]: s.value
        for family in text_string_to_metric_families(scrape)
        for s in family.samples
        if s.name == "loraswap_exposures_total" and s.labels.get("alias") == ALIAS
    }
    assert exposures == served
    print(f"A/B experiment: {len(replies)} requests + exposures + feedback in {elapsed:.1f}s")
