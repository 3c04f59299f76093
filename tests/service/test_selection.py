"""Choosing for the caller: the pure rules, then auto and cascade on a live server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.app import create_app
from service.errors import Unsatisfiable
from service.selection import Candidate, choose_auto, needs_escalation
from service.settings import Settings
from tests.service import images
from tests.support import Server, in_process_client, run_server

FAST = Candidate("fast", 0.90, 5.0)
SLOW = Candidate("slow", 0.95, 50.0)


def test_auto_picks_the_most_accurate_model_that_fits() -> None:
    assert choose_auto([FAST, SLOW], 100, None).candidate is SLOW
    assert choose_auto([FAST, SLOW], 100, None).reason == "most_accurate"
    tight = choose_auto([FAST, SLOW], 10, None)
    assert tight.candidate is FAST and tight.reason == "latency_budget"
    assert choose_auto([FAST, SLOW], None, 0.93).candidate is SLOW
    assert choose_auto([FAST, SLOW], None, None).candidate is SLOW


@pytest.mark.parametrize(
    ("budget", "floor", "says"),
    [
        (10, 0.93, "fits max_latency_ms=10"),
        (None, 0.99, "no model reaches min_accuracy=0.99"),
        (1, None, "fits max_latency_ms=1"),
    ],
)
def test_auto_explains_an_impossible_request(budget: float | None, floor: float | None, says: str) -> None:
    with pytest.raises(Unsatisfiable) as error:
        choose_auto([FAST, SLOW], budget, floor)
    assert says in error.value.message
    assert "most accurate: slow 95.00 %" in error.value.message and "fastest: fast" in error.value.message


def test_escalation_is_strictly_below_the_threshold() -> None:
    assert needs_escalation(0.89, 0.9) and not needs_escalation(0.9, 0.9) and not needs_escalation(0.95, 0.9)


@pytest.fixture(scope="module")
def server(slower_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The queue-wait cap is lifted: these tests build a queue on purpose, to watch auto react. So
    # is the request cap: a burst of 16 plus the request under test must all be admitted (at the
    # default 16 the last one got 503 whenever none of the burst had finished yet).
    with run_server(
        slower_models_dir,
        tmp_path_factory.mktemp("selection"),
        max_batch_size="2",
        queue_size="64",
        max_queue_wait_ms="60000",
        max_concurrent_requests="32",
    ) as live:
        yield live


def post(server: Server, blob: bytes, **params: str | float) -> httpx.Response:
    return httpx.post(
        f"{server.url}/classify",
        params=params,
        content=blob,
        headers={"Content-Type": "image/png"},
        timeout=120,
    )


def slow_latency_ms(server: Server) -> float:
    for _ in range(3):
        assert post(server, images.jpeg(), model="slow").status_code == 200
    return float(httpx.get(f"{server.url}/models/slow").json()["live_latency_p50_ms"])


def test_auto_follows_the_budget_and_refuses_the_impossible(server: Server) -> None:
    slow_ms = slow_latency_ms(server)
    loose = post(server, images.jpeg(), model="auto", max_latency_ms=slow_ms * 20).json()
    assert loose["model"] == "slow" and loose["mode"] == "auto"
    assert loose["selection"]["reason"] == "most_accurate"
    assert loose["selection"]["predicted_ms"] > 0 and loose["selection"]["actual_ms"] > 0
    tight = post(server, images.jpeg(), model="auto", max_latency_ms=slow_ms / 4).json()
    assert tight["model"] == "fast" and tight["selection"]["reason"] == "latency_budget"
    impossible = post(server, images.jpeg(), model="auto", max_latency_ms=slow_ms / 4, min_accuracy=0.9)
    assert impossible.status_code == 422, impossible.text
    assert impossible.json()["error"]["code"] == "constraints_unsatisfiable"
    assert "slow" in impossible.json()["error"]["message"]


def test_auto_compares_min_accuracy_with_the_hardest_source(server: Server) -> None:
    # The tiny manifest: slow is 95 % overall but 92 % on its hardest source ("kaggle").
    slow = httpx.get(f"{server.url}/models/slow").json()
    assert (slow["test_accuracy"], slow["selection_accuracy"]) == (0.95, pytest.approx(0.92))
    assert slow["selection_accuracy_source"] == "kaggle"
    assert slow["test_accuracy_by_source"] == {"web": pytest.approx(0.97), "kaggle": pytest.approx(0.92)}
    refused = post(server, images.jpeg(), model="auto", min_accuracy=0.93)
    assert refused.status_code == 422 and "no model reaches min_accuracy=0.93" in refused.text
    assert post(server, images.jpeg(), model="auto", min_accuracy=0.915).json()["model"] == "slow"


async def _until_queued(client: httpx.AsyncClient, server: Server, model: str, at_least: int) -> None:
    """Wait (at most 30 s) until the model's queue holds the burst, as the server itself reports it."""
    deadline = time.monotonic() + 30
    while (await client.get(f"{server.url}/models/{model}")).json()["queue_depth"] < at_least:
        assert time.monotonic() < deadline, f"{model}'s queue never reached {at_least}"
        await asyncio.sleep(0.005)


async def _auto_under_queue(server: Server, budget_ms: float) -> tuple[dict[str, object], list[int]]:
    blob = images.jpeg()
    async with httpx.AsyncClient(timeout=120) as client:

        def send(**params: str | float) -> object:
            return client.post(
                f"{server.url}/classify", params=params, content=blob, headers={"Content-Type": "image/jpeg"}
            )

        load = [asyncio.create_task(send(model="slow")) for _ in range(16)]
        await _until_queued(client, server, "slow", at_least=10)
        chosen = (await send(model="auto", max_latency_ms=budget_ms)).json()
        statuses = [r.status_code for r in await asyncio.gather(*load)]
        return chosen, statuses


@pytest.mark.slow
def test_auto_moves_to_the_cheaper_model_when_a_queue_builds(server: Server) -> None:
    slow_ms = slow_latency_ms(server)
    budget = slow_ms * 4
    assert post(server, images.jpeg(), model="auto", max_latency_ms=budget).json()["model"] == "slow"
    chosen, statuses = asyncio.run(_auto_under_queue(server, budget))
    assert chosen.get("model") == "fast", chosen
    assert chosen["selection"]["reason"] == "latency_budget"
    assert statuses == [200] * 16


def gray(level: int) -> bytes:
    return images.encode(Image.new("RGB", (40, 40), (level, level, level)), "PNG")


def test_cascade_escalates_exactly_below_the_threshold(server: Server) -> None:
    blob = gray(140)
    small = post(server, blob, model="fast").json()["results"][0]["confidence"]
    assert 0.5 < small < 1.0
    below = post(server, blob, model="cascade", min_confidence=small + 1e-9).json()
    at = post(server, blob, model="cascade", min_confidence=small).json()
    assert below["results"][0]["escalated"] and below["models_run"] == ["fast", "slow"]
    assert below["results"][0]["model"] == "slow"
    assert set(below["results"][0]["confidences"]) == {"fast", "slow"}
    assert below["results"][0]["confidences"]["fast"] == small
    assert not at["results"][0]["escalated"] and at["models_run"] == ["fast"]
    assert at["results"][0]["model"] == "fast" and at["selection"]["reason"] == "confident"


def test_cascade_uses_the_manifest_threshold_and_escalates_per_image(server: Server) -> None:
    threshold = 0.9  # from the tiny manifest
    blobs = [gray(level) for level in (0, 60, 120, 180, 240)]
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    small = httpx.post(f"{server.url}/classify", params={"model": "fast"}, files=files, timeout=60).json()
    body = httpx.post(f"{server.url}/classify", params={"model": "cascade"}, files=files, timeout=60).json()
    assert body["selection"]["threshold"] == threshold
    for alone, mixed in zip(small["results"], body["results"], strict=True):
        assert mixed["escalated"] == (alone["confidence"] < threshold)
        assert mixed["model"] == ("slow" if mixed["escalated"] else "fast")


def test_cascade_degrades_instead_of_failing_when_the_deadline_is_short(server: Server) -> None:
    slow_ms = slow_latency_ms(server)
    response = httpx.post(
        f"{server.url}/classify",
        params={"model": "cascade", "min_confidence": 1.0},
        content=gray(140),
        timeout=60,
        headers={"Content-Type": "image/png", "X-Deadline-Ms": str(slow_ms / 2)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["degraded"] and not body["results"][0]["escalated"]
    assert body["models_run"] == ["fast"] and body["selection"]["reason"] == "degraded"


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"model": "cascade", "cascade": "fast"}, 400),
        ({"model": "cascade", "cascade": "fast,nope"}, 404),
        ({"model": "cascade", "cascade": "slow,fast"}, 400),  # not calibrated, no min_confidence
        ({"model": "cascade", "min_confidence": 2}, 422),
        ({"model": "auto", "min_accuracy": -1}, 422),
        ({"model": "auto", "max_latency_ms": 0}, 422),
    ],
)
def test_selection_parameters_are_validated(
    server: Server, params: dict[str, str | float], status: int
) -> None:
    response = post(server, images.jpeg(), **params)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}


def test_selection_metrics(server: Server) -> None:
    post(server, gray(140), model="cascade", min_confidence=1.0)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'catdog_cascade_escalations_total{large="slow",small="fast"}' in text
    assert 'catdog_selection_total{mode="auto"' in text
    assert 'catdog_requests_total{model="cascade",outcome="ok",status_class="2xx"}' in text


def test_auto_that_only_the_deadline_rules_out_is_a_504_not_a_422(server: Server) -> None:
    slow_ms = slow_latency_ms(server)
    # Only slow (92 % on its hardest source) meets min_accuracy=0.9, and it needs more than the
    # deadline leaves: the request was fine, time ran out, so 504 like any missed deadline.
    late = httpx.post(
        f"{server.url}/classify",
        params={"model": "auto", "min_accuracy": 0.9},
        content=images.jpeg(),
        timeout=60,
        headers={"Content-Type": "image/png", "X-Deadline-Ms": str(max(1, round(slow_ms / 4)))},
    )
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"
    # Constraints that no deadline could help stay a 422.
    assert post(server, images.jpeg(), model="auto", min_accuracy=0.99).status_code == 422


def test_a_failed_escalation_returns_the_small_models_answers_degraded(tiny_models_dir: Path) -> None:
    app = create_app(Settings(models_dir=tiny_models_dir, intra_op_threads=1))

    async def scenario() -> tuple[int, dict[str, object]]:
        async with in_process_client(app) as client:
            app.state.catdog.classifier.registry.get("slow").batcher.capacity = 0  # its queue is full
            response = await client.post(
                "/classify",
                params={"model": "cascade", "min_confidence": 1.0},
                content=images.jpeg(),
                headers={"Content-Type": "image/jpeg"},
            )
            return response.status_code, response.json()

    status, body = asyncio.run(scenario())
    assert status == 200, body
    (result,) = body["results"]
    assert result["model"] == "fast" and result["degraded"] is True and result["escalated"] is False
    assert body["selection"]["reason"] == "degraded"
