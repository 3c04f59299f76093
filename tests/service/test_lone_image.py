"""A lone image on an idle lane of one-thread workers: on every core or on one, as measured."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import registry
from service.batching import EVERY_CORE, ONE_CORE, Batcher, InferenceLane, LoneImageLayout
from service.settings import Settings
from tests.service import images as encoded
from tests.service.test_batching import RecordingSession, images
from tests.support import given_back, run_server


def test_the_faster_layout_wins_and_the_other_is_tried_now_and_then() -> None:
    now = [0.0]
    layout = LoneImageLayout(0.020, 0.010, explore_after_s=2.0, clock=lambda: now[0])
    chosen = []
    for _ in range(10):  # one lone image every 0.5 s
        now[0] += 0.5
        chosen.append(layout.choose())
    assert chosen == [EVERY_CORE] * 3 + [ONE_CORE] + [EVERY_CORE] * 3 + [ONE_CORE] + [EVERY_CORE] * 2
    for _ in range(4):  # a neighbour takes a core: runs on every core get slower
        layout.record(EVERY_CORE, 0.050)
    assert layout.faster() == ONE_CORE
    now[0] += 0.5
    assert layout.choose() == ONE_CORE


@contextlib.asynccontextmanager
async def _running_batcher(
    narrow: RecordingSession, wide: RecordingSession, lane: InferenceLane, layout: LoneImageLayout
) -> AsyncIterator[tuple[Batcher, list[str]]]:
    """A started batcher of `narrow` (the workers' session) and `wide` (every core), and the
    lone-image layouts it counted; closed with its lane afterwards."""
    counted: list[str] = []
    batcher = Batcher(
        "m",
        narrow,
        input_name="image",
        output_name="logits",
        max_batch=8,
        max_wait_s=0.0,
        capacity=64,
        lane=lane,
        fallback_seconds=0.001,
        every_core=(wide, layout),
        on_lone_image=counted.append,
    )
    batcher.start()
    try:
        yield batcher, counted
    finally:
        wide.gate.set()
        await batcher.close()
        lane.shutdown()


def test_a_lone_image_takes_every_worker_and_others_wait_for_it() -> None:
    async def test() -> None:
        narrow, wide, lane = RecordingSession(), RecordingSession(), InferenceLane(workers=2)
        wide.gate.clear()
        async with _running_batcher(narrow, wide, lane, LoneImageLayout(2.0, 1.0)) as (batcher, counted):
            first = asyncio.create_task(batcher.infer(images(1), None))
            await asyncio.to_thread(wide.entered.wait, 10)
            assert not lane.free  # both workers held by the one batch using every core
            # Both workers count as busy for about the every-core run's predicted second.
            assert batcher.backlog_seconds() == pytest.approx(1.0, abs=0.1)
            second = asyncio.create_task(batcher.infer(images(2, 3), None))
            await asyncio.sleep(0.1)
            assert narrow.batch_sizes == [] and batcher.pending == 2  # not run beside it
            wide.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(first, second), 10)
            assert [[r.logits[0] for r in answer] for answer in answers] == [[1], [2, 3]]
            # Two images are no lone image: they ran on a worker's own session.
            assert wide.batch_sizes == [1] and narrow.batch_sizes == [2]
            assert counted == [EVERY_CORE] and await given_back(lane)

    asyncio.run(test())


def test_a_lone_image_stays_on_one_core_when_that_measured_faster() -> None:
    async def test() -> None:
        narrow, wide, lane = RecordingSession(), RecordingSession(), InferenceLane(workers=2)
        layout = LoneImageLayout(one_core_s=0.5, every_core_s=1.0)
        async with _running_batcher(narrow, wide, lane, layout) as (batcher, counted):
            [answer] = await asyncio.wait_for(batcher.infer(images(4), None), 10)
            assert answer.logits[0] == 4 and narrow.batch_sizes == [1] and wide.batch_sizes == []
            assert counted == [ONE_CORE]
            assert len(layout.seconds[ONE_CORE].samples) == 2  # its run was measured as a lone one

    asyncio.run(test())


def test_an_image_with_others_decoding_behind_it_is_not_lone() -> None:
    async def test() -> None:
        narrow, wide, lane = RecordingSession(), RecordingSession(), InferenceLane(workers=2)
        async with _running_batcher(narrow, wide, lane, LoneImageLayout(2.0, 1.0)) as (batcher, counted):
            with batcher.reservation(1):  # another request's image, still decoding
                await asyncio.wait_for(batcher.infer(images(5), None), 10)
            assert narrow.batch_sizes == [1] and wide.batch_sizes == [] and counted == []

    asyncio.run(test())


def test_a_real_server_with_two_workers_answers_lone_images_alike_on_either_layout(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    """The second session is built and used by the real server, both layouts give the same
    answer, and every lone image is counted once. Lone images for a little over 2 s: the slower
    layout is then tried at least once, whichever it is."""
    with run_server(tiny_models_dir, tmp_path, inference_workers="2") as server:
        answers, started = [], time.monotonic()
        while time.monotonic() - started < 2.5:
            response = httpx.post(
                f"{server.url}/classify?model=fast",
                content=encoded.jpeg(),
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            answers.append(response.json()["results"][0]["confidence"])
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    counts = {
        sample.labels["layout"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "catdog_lone_images"
        for sample in family.samples
        if sample.name == "catdog_lone_images_total" and sample.labels["model"] == "fast"
    }
    assert counts[ONE_CORE] >= 1 and counts[EVERY_CORE] >= 1, counts
    assert counts[ONE_CORE] + counts[EVERY_CORE] == len(answers)
    assert max(answers) - min(answers) < 1e-5


def test_the_every_core_session_has_a_thread_per_cpu_not_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spare worker (three on two CPUs) must not give the lone-image session three threads."""
    threads_asked: list[int] = []

    def create_session(
        path: Path, providers: list[str], threads: int, spinning: str, **options: object
    ) -> object:
        threads_asked.append(threads)
        return object()

    monkeypatch.setattr(registry, "create_session", create_session)
    lane = InferenceLane(workers=3, every_core_threads=2)
    monkeypatch.setattr(lane, "run_and_wait", lambda work: 0.01)
    entry = SimpleNamespace(input=SimpleNamespace(name="image", height=8, width=8))
    cpu = ["CPUExecutionProvider"]
    made = registry._every_core_session(Settings(), Path("m.onnx"), entry, cpu, 1, lane, 0.02)
    lane.shutdown()
    assert made is not None
    assert threads_asked == [2]
