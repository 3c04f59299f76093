"""The micro-batcher's dispatch rule, against a recording session (no model needed)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from service.batching import (
    TRUSTED_RUNS,
    Batcher,
    BatchStats,
    InferenceLane,
    Window,
    _Job,
    _Running,
    batch_buckets,
    pad_batch,
)
from service.errors import ModelUnavailable, Overloaded
from service.registry import SPARE_WORKERS_MAX_RUN_S, ModelRegistry, batches_at_once
from tests.support import given_back


class RecordingSession:
    """Answers logits [index, 0] per image; can hold a run until released."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="image")]

    def run(self, _outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.entered.set()
        self.gate.wait(timeout=30)
        batch = feeds["image"]
        self.batch_sizes.append(len(batch))
        return [np.stack([batch[:, 0], np.zeros(len(batch))], axis=1)]


def make_batcher(
    session: RecordingSession, lane: InferenceLane, max_wait_s: float, capacity: int = 64, **options: Any
) -> Batcher:
    return Batcher(
        "m",
        session,
        input_name="image",
        output_name="logits",
        max_batch=8,
        max_wait_s=max_wait_s,
        capacity=capacity,
        lane=lane,
        fallback_seconds=0.001,
        **options,
    )


def measured(stats: BatchStats, size: int, seconds: float) -> None:
    """Runs at a batch size enough times for their median to be its estimate."""
    for _ in range(TRUSTED_RUNS):
        stats.batch_seconds.setdefault(size, Window()).update(seconds)


def images(*values: int) -> list[np.ndarray]:
    return [np.full((1,), v, dtype=np.float32) for v in values]


async def _with_batcher(test: Any, max_wait_s: float, capacity: int = 64) -> Any:
    session, lane = RecordingSession(), InferenceLane()
    batcher = make_batcher(session, lane, max_wait_s, capacity)
    batcher.start()
    try:
        return await test(session, batcher)
    finally:
        session.gate.set()
        await batcher.close()
        lane.shutdown()


def test_idle_lane_runs_at_once_instead_of_waiting_for_company() -> None:
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        # max_wait is a minute: only the idle-lane rule can answer within the 10 s timeout.
        [result] = await asyncio.wait_for(batcher.infer(images(7), None), timeout=10)
        assert result.logits[0] == 7 and result.batch_size == 1

    asyncio.run(_with_batcher(test, max_wait_s=60))


def test_requests_arriving_while_the_lane_is_busy_share_one_batch_in_order() -> None:
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        session.gate.clear()
        first = asyncio.create_task(batcher.infer(images(1), None))
        await asyncio.to_thread(session.entered.wait, 10)  # batch [1] is inside session.run
        later = [asyncio.create_task(batcher.infer(images(v), None)) for v in (2, 3, 4)]
        await asyncio.sleep(0.05)
        assert batcher.pending == 3
        session.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
        assert session.batch_sizes == [1, 3]
        assert [r[0].logits[0] for r in results] == [1, 2, 3, 4]

    asyncio.run(_with_batcher(test, max_wait_s=0.01))


def test_padded_batches_run_at_bucket_sizes_on_their_own_sessions_and_answer_only_the_real_images() -> None:
    """Each padded size has its own session, which sees no other shape (on CUDA a change of
    input shape makes onnxruntime plan its convolutions again: service/registry.py)."""
    session, lane = RecordingSession(), InferenceLane()
    by_size = {1: session, 2: RecordingSession(), 4: RecordingSession(), 8: RecordingSession()}
    batcher = make_batcher(session, lane, max_wait_s=0.01, batch_buckets=by_size)

    async def test() -> None:
        batcher.start()
        session.gate.clear()
        first = asyncio.create_task(batcher.infer(images(1), None))
        await asyncio.to_thread(session.entered.wait, 10)
        later = [asyncio.create_task(batcher.infer(images(v), None)) for v in (2, 3, 4)]
        await asyncio.sleep(0.05)
        session.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
        assert session.batch_sizes == [1]
        assert by_size[4].batch_sizes == [4]  # three images, one blank
        assert by_size[2].batch_sizes == by_size[8].batch_sizes == []
        assert [r[0].logits[0] for r in results] == [1, 2, 3, 4]
        assert [r[0].batch_size for r in results] == [1, 3, 3, 3]
        await batcher.close()

    try:
        asyncio.run(test())
    finally:
        lane.shutdown()


def test_pad_batch_fills_to_the_next_bucket_with_blanks() -> None:
    batch = np.ones((5, 2, 2, 3), dtype=np.uint8)
    padded = pad_batch(batch, batch_buckets(8))
    assert padded.shape == (8, 2, 2, 3) and padded.dtype == np.uint8
    assert (padded[:5] == 1).all() and (padded[5:] == 0).all()
    assert len(pad_batch(batch[:4], [1, 2, 4, 8])) == 4
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(5) == [1, 2, 4, 5] and batch_buckets(1) == [1]


def test_full_queue_is_refused_with_retry_after() -> None:
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        session.gate.clear()
        running = asyncio.create_task(batcher.infer(images(0), None))
        await asyncio.to_thread(session.entered.wait, 10)
        queued = asyncio.create_task(batcher.infer(images(1, 2, 3, 4), None))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.infer(images(5), None)
        assert int(refused.value.headers["Retry-After"]) >= 1
        session.gate.set()
        await asyncio.wait_for(asyncio.gather(running, queued), timeout=10)

    asyncio.run(_with_batcher(test, max_wait_s=0.01, capacity=4))


def test_waiting_for_another_models_batch_is_queue_time_not_inference_time() -> None:
    async def test() -> None:
        lane = InferenceLane()
        held, quick = RecordingSession(), RecordingSession()
        held.gate.clear()
        other, mine = make_batcher(held, lane, 0.0), make_batcher(quick, lane, 0.0)
        other.start()
        mine.start()
        try:
            blocking = asyncio.create_task(other.infer(images(1), None))
            await asyncio.to_thread(held.entered.wait, 10)  # the lane is now busy with `other`
            answer = asyncio.create_task(mine.infer(images(2), None))
            await asyncio.sleep(0.3)
            held.gate.set()
            (result,) = await asyncio.wait_for(answer, 10)
            await blocking
            # `mine` waited ~0.3 s for the lane: that is queue time; its own run took ~nothing.
            assert result.inference_seconds < 0.1
            assert result.queue_seconds >= 0.25
            assert result.batch_size == 1 and result.logits[0] == 2
        finally:
            held.gate.set()
            await other.close()
            await mine.close()
            lane.shutdown()

    asyncio.run(test())


def test_a_crashed_batcher_fails_its_requests_fast_and_reports_itself() -> None:
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        session.gate.clear()
        running = asyncio.create_task(batcher.infer(images(1), None))
        await asyncio.to_thread(session.entered.wait, 10)
        queued = asyncio.create_task(batcher.infer(images(2), None))
        await asyncio.sleep(0.05)

        def broken(jobs: list[_Job]) -> Any:
            raise RuntimeError("bug outside the inference try")

        # A crash in the batch decision, whether the event loop or the freed worker makes it.
        batcher._partition = broken  # type: ignore[method-assign]
        session.gate.set()
        await asyncio.wait_for(running, 10)  # the batch in flight still completes
        with pytest.raises(ModelUnavailable):
            await asyncio.wait_for(queued, 10)  # the queued one fails instead of hanging
        assert batcher.failure is not None and "bug outside" in str(batcher.failure)
        with pytest.raises(ModelUnavailable):
            await asyncio.wait_for(batcher.infer(images(3), None), 1)

    asyncio.run(_with_batcher(test, max_wait_s=0.0))


def test_queue_places_are_reserved_before_decoding_and_released_on_every_exit() -> None:
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        session.gate.clear()
        with batcher.reservation(3) as first:  # 3 of 4 places held while "decoding"
            with pytest.raises(Overloaded), batcher.reservation(2):
                pass
            running = asyncio.create_task(batcher.infer(images(1, 2, 3), None, first))
            await asyncio.sleep(0.05)
            assert batcher.reserved == 0  # the places became jobs: not counted twice
            session.gate.set()
            await asyncio.wait_for(running, 10)
        with pytest.raises(RuntimeError), batcher.reservation(4):
            raise RuntimeError("decoding failed")  # the places come back on an error too
        assert batcher.reserved == 0
        with batcher.reservation(4):
            pass

    asyncio.run(_with_batcher(test, max_wait_s=0.0, capacity=4))


def test_a_batcher_that_crashes_while_a_request_decodes_refuses_its_jobs() -> None:
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        with batcher.reservation(1) as held:  # admitted, still "decoding"
            assert batcher._task is not None
            batcher._task.cancel()  # the worker dies meanwhile
            await asyncio.sleep(0.05)
            with pytest.raises(ModelUnavailable):  # not queued into a queue nobody serves
                await asyncio.wait_for(batcher.infer(images(1), None, held), 1)

    asyncio.run(_with_batcher(test, max_wait_s=0.0))


def test_a_request_that_would_wait_past_the_queue_wait_cap_is_refused() -> None:
    # Places are free (capacity 64), but the images ahead would take longer than the cap to run:
    # refused at once with Retry-After, instead of being admitted into a wait nobody bounded.
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        batcher.max_queue_wait_s = 0.5
        measured(batcher.stats, 8, 0.4)  # measured: a batch of 8 takes 0.4 s
        session.gate.clear()
        running = asyncio.create_task(batcher.infer(images(*range(8)), None))
        await asyncio.to_thread(session.entered.wait, 10)
        # Behind the running batch: nothing queued yet, so one more batch is admitted (0.4 s).
        queued = asyncio.create_task(batcher.infer(images(*range(8)), None))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:  # it would wait 0.8 s for two batches
            await batcher.infer(images(9), None)
        assert "0.5 s" in str(refused.value) and int(refused.value.headers["Retry-After"]) >= 1
        session.gate.set()
        await asyncio.wait_for(asyncio.gather(running, queued), timeout=10)

    asyncio.run(_with_batcher(test, max_wait_s=0.01))


def test_predicted_waits_count_the_images_still_decoding_ahead() -> None:
    # Requests admitted earlier hold places while their images decode, and they are queued ahead
    # of a new one: deadlines, auto and Retry-After must count them, or under load they promise
    # waits that the queue then breaks. A request's own places are not ahead of itself.
    async def test() -> None:
        session, lane = RecordingSession(), InferenceLane()
        target, other = make_batcher(session, lane, 0.0), make_batcher(session, lane, 0.0)
        for batcher in (target, other):
            measured(batcher.stats, 8, 1.5)  # measured: a batch of 8 takes 1.5 s
        models: Any = {
            name: SimpleNamespace(batcher=batcher) for name, batcher in (("m", target), ("o", other))
        }
        registry = ModelRegistry(cast(Any, None), models, "m")
        model = models["m"]
        assert registry.backlog_seconds(model) == 0.0
        with target.reservation(8):  # an earlier request to the same model, still decoding
            assert registry.backlog_seconds(model) == pytest.approx(1.5)
            assert target.retry_after_seconds() == 2
            with target.reservation(2) as own:
                assert registry.backlog_seconds(model, own) == pytest.approx(1.5)
        with other.reservation(8):  # another model's images, decoding: one batch of theirs first
            assert registry.backlog_seconds(model) == pytest.approx(1.5)
        assert registry.backlog_seconds(model) == 0.0
        lane.shutdown()

    asyncio.run(test())


class ConcurrencySession(RecordingSession):
    """Counts the runs inside session.run at once; every run waits at the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.clear()
        self._lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return super().run(outputs, feeds)
        finally:
            with self._lock:
                self.inside -= 1


def test_a_lane_of_two_workers_runs_two_batches_at_once_and_never_a_third() -> None:
    async def test() -> None:
        session, lane = ConcurrencySession(), InferenceLane(workers=2)
        batcher = make_batcher(session, lane, max_wait_s=0.0)
        batcher.start()
        try:
            first = asyncio.create_task(batcher.infer(images(1), None))
            await asyncio.to_thread(session.entered.wait, 10)
            second = asyncio.create_task(batcher.infer(images(2), None))
            for _ in range(200):  # the second batch starts beside the first, not after it
                if session.inside == 2:
                    break
                await asyncio.sleep(0.01)
            assert session.inside == 2 and not lane.free and batcher.running == 2
            third = asyncio.create_task(batcher.infer(images(3, 4), None))
            await asyncio.sleep(0.1)
            assert session.most_inside == 2 and batcher.pending == 2  # waits for a free worker
            session.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(first, second, third), 10)
            assert [[r.logits[0] for r in answer] for answer in answers] == [[1], [2], [3, 4]]
            assert session.most_inside == 2 and await given_back(lane) and batcher.running == 0
        finally:
            session.gate.set()
            await batcher.close()
            lane.shutdown()

    asyncio.run(test())


def test_a_model_of_long_runs_leaves_the_spare_worker_to_the_others() -> None:
    # Two CPUs, three workers: the slow model runs two batches at once at most, however much is
    # queued, and the third worker is free for the fast model (registry.batches_at_once).
    async def test() -> None:
        slow, fast = ConcurrencySession(), ConcurrencySession()
        lane = InferenceLane(workers=3, spare=1)
        slow_batcher = make_batcher(slow, lane, max_wait_s=0.0, max_running=2)
        fast_batcher = make_batcher(fast, lane, max_wait_s=0.0)
        for batcher in (slow_batcher, fast_batcher):
            batcher.start()
        try:
            waiting = [asyncio.create_task(slow_batcher.infer(images(1), None))]
            await asyncio.to_thread(slow.entered.wait, 10)
            waiting.append(asyncio.create_task(slow_batcher.infer(images(2), None)))
            for _ in range(200):
                if slow.inside == 2:
                    break
                await asyncio.sleep(0.01)
            waiting.append(asyncio.create_task(slow_batcher.infer(images(3), None)))
            await asyncio.sleep(0.1)  # time for a third batch to start, were it allowed
            assert slow.most_inside == 2 and slow_batcher.pending == 1 and lane.free
            assert slow_batcher.workers == 2 and fast_batcher.workers == 3
            waiting.append(asyncio.create_task(fast_batcher.infer(images(4), None)))
            await asyncio.wait_for(asyncio.to_thread(fast.entered.wait, 10), 10)
            assert fast.inside == 1 and not lane.free
            slow.gate.set()
            fast.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
            assert [answer[0].logits[0] for answer in answers] == [1, 2, 3, 4]
            assert slow.most_inside == 2
        finally:
            slow.gate.set()
            fast.gate.set()
            for batcher in (slow_batcher, fast_batcher):
                await batcher.close()
            lane.shutdown()

    asyncio.run(test())


def test_only_models_of_long_runs_are_kept_off_the_spare_workers() -> None:
    lane = InferenceLane(workers=3, spare=1)
    try:
        assert batches_at_once(lane, SPARE_WORKERS_MAX_RUN_S * 3) == 2
        assert batches_at_once(lane, SPARE_WORKERS_MAX_RUN_S / 2) is None
        assert batches_at_once(InferenceLane(workers=2), SPARE_WORKERS_MAX_RUN_S * 3) is None
    finally:
        lane.shutdown()


@pytest.mark.parametrize("balance", [True, False])
def test_a_queue_is_shared_between_free_workers_instead_of_one_taking_it_all(balance: bool) -> None:
    # Six images queued at once on an idle lane of two one-thread workers: as two batches of three
    # side by side, each image answered after three runs' time, not one worker running all six
    # while the other idles (the tail that balancing removes; README, "Performance under
    # contention"). Without balancing, one batch of six.
    async def test() -> None:
        session, lane = ConcurrencySession(), InferenceLane(workers=2)
        batcher = make_batcher(session, lane, max_wait_s=0.0)
        lane.balanced = balance
        batcher.start()
        try:
            request = asyncio.create_task(batcher.infer(images(*range(6)), None))
            await asyncio.to_thread(session.entered.wait, 10)
            await asyncio.sleep(0.1)  # time for a second batch to start, if there is one
            assert session.inside == (2 if balance else 1)
            session.gate.set()
            answers = await asyncio.wait_for(request, 10)
            assert [r.logits[0] for r in answers] == list(range(6))  # in upload order
            assert sorted(session.batch_sizes) == ([3, 3] if balance else [6])
        finally:
            session.gate.set()
            await batcher.close()
            lane.shutdown()

    asyncio.run(test())


@pytest.mark.parametrize(("busy_for_s", "taken"), [(0.0, 2), (0.15, 3), (1.0, 4)])
def test_a_freed_worker_leaves_a_busy_workers_share_for_it(busy_for_s: float, taken: int) -> None:
    # Four images queued at 0.1 s each; worker B is free now, worker A busy for `busy_for_s` more.
    # Dealt out by predicted finish: A free now too, two each; A free in 0.15 s, it takes the
    # third image (done at 0.25 s, where B would finish it at 0.3); A busy for a second, B all four.
    async def test() -> None:
        lane = InferenceLane(workers=2)
        batcher = make_batcher(RecordingSession(), lane, max_wait_s=0.0)
        measured(batcher.stats, 4, 0.4)
        lane.claim(1)  # worker A's batch, as _start_batch records it
        batcher._running_batches.append(_Running(1, time.monotonic(), busy_for_s))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        batcher._queue.extend(_Job(a, loop.create_future(), now, None) for a in images(1, 2, 3, 4))
        try:
            assert batcher.share_of_queue(limit=8) == taken
            assert batcher.share_of_queue(limit=3) == min(taken, 3)
        finally:
            lane.shutdown()

    asyncio.run(test())


def test_a_batch_that_fails_after_inference_fails_its_own_requests_instead_of_hanging() -> None:
    async def test() -> None:
        session, lane = RecordingSession(), InferenceLane(workers=2)

        def broken_metrics(size: int, seconds: float) -> None:
            raise RuntimeError("bug after the run")

        batcher = make_batcher(session, lane, max_wait_s=0.0)
        batcher._on_batch = broken_metrics
        batcher.start()
        try:
            with pytest.raises(ModelUnavailable):
                await asyncio.wait_for(batcher.infer(images(1), None), 10)
            assert batcher.failure is not None and "after the run" in str(batcher.failure)
            with pytest.raises(ModelUnavailable):
                await asyncio.wait_for(batcher.infer(images(2), None), 1)
        finally:
            await asyncio.wait_for(batcher.close(), 10)
            lane.shutdown()

    asyncio.run(test())


def test_predicted_waits_follow_the_workers_dispatch() -> None:
    # With two workers and one free, new work starts at once: predicting the images ahead as if
    # they ran one after another would refuse requests (queue-wait cap) that start in time.
    async def test() -> None:
        session, lane = ConcurrencySession(), InferenceLane(workers=2, balanced=True)
        batcher = make_batcher(session, lane, 0.0)
        for size, seconds in ((8, 1.0), (4, 0.6)):
            measured(batcher.stats, size, seconds)
        with batcher.reservation(7):  # 4 and 3 side by side
            assert batcher.backlog_seconds() == pytest.approx(3 * 0.125)
        with batcher.reservation(20):  # dealt out one by one: 10 on each worker, 1/8 s each
            assert batcher.backlog_seconds() == pytest.approx(1.25)
        assert batcher.inference_seconds(20) == pytest.approx(1.25)
        lane.balanced = False  # a freed worker takes up to eight of what is queued
        with batcher.reservation(7):  # one batch of seven on one worker, the other free
            assert batcher.backlog_seconds() == 0.0
        with batcher.reservation(20):  # 8 and 8 side by side, then 4 on whichever frees first
            assert batcher.backlog_seconds() == pytest.approx(1.0)
        assert batcher.inference_seconds(20) == pytest.approx(1.6)
        lane.balanced = True
        batcher.start()
        try:  # a running batch counts for what it has left, not for its whole time
            running = asyncio.create_task(batcher.infer(images(*range(8)), None))
            await asyncio.to_thread(session.entered.wait, 10)
            await asyncio.sleep(0.2)
            with batcher.reservation(8):
                # Two batches of four (0.6 s each) with at most 0.4 s left, then four more images
                # on each worker (0.5 s): 0.9, or 1.1 if their whole time counted.
                assert batcher.backlog_seconds() <= 0.91
        finally:
            session.gate.set()
            await asyncio.wait_for(running, 10)
            await batcher.close()
            lane.shutdown()

    asyncio.run(test())


class SlowSession(RecordingSession):
    """Takes `per_image` seconds per image, as a slow model on one thread would."""

    def __init__(self, per_image: float) -> None:
        super().__init__()
        self.per_image = per_image

    def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.per_image * len(feeds["image"]))
        return super().run(outputs, feeds)


def test_a_slow_model_runs_smaller_batches_within_the_batch_time_budget() -> None:
    # Eight images of a model taking 40 ms per image, budget 60 ms: batches of one (two would
    # take 80 ms), never one of eight (320 ms), once its first batch is measured.
    async def test() -> None:
        session, lane = SlowSession(per_image=0.04), InferenceLane()
        batcher = make_batcher(session, lane, max_wait_s=0.0)
        batcher.max_batch_s = 0.06
        batcher.start()
        try:
            await asyncio.wait_for(batcher.infer(images(0), None), 10)
            assert batcher.batch_limit == 1
            await asyncio.wait_for(batcher.infer(images(*range(1, 8)), None), 10)
            assert session.batch_sizes == [1] * 8
            batcher.max_batch_s = 1.0  # a budget the model fits: the full batch of eight again
            assert batcher.batch_limit == 8
        finally:
            await batcher.close()
            lane.shutdown()

    asyncio.run(test())


def test_one_slow_run_at_a_rarely_seen_size_does_not_become_that_size_s_estimate() -> None:
    """A stalled run (a CPU hiccup, or on CUDA a convolution replanned: 0.3-2.6 s on an H200)
    must not stand as the estimate for its batch size: the batch limit would then exclude that
    size, no new run would correct it, and admission would refuse on predicted waits for good."""
    stats = BatchStats()
    for _ in range(10):
        stats.batch_seconds.setdefault(1, Window()).update(0.010)
    stats.batch_seconds.setdefault(3, Window()).update(1.5)
    assert stats.seconds_for(3, fallback=0.010) == pytest.approx(0.030)  # scaled from batch 1
    assert stats.seconds_for(4, fallback=0.010) == pytest.approx(0.040)
    for _ in range(2):  # slow again and again: believed
        stats.batch_seconds[3].update(1.5)
    assert stats.seconds_for(3, fallback=0.010) == 1.5


def test_a_size_measured_a_few_times_and_faster_than_scaled_keeps_its_own_figure() -> None:
    stats = BatchStats()
    for _ in range(10):
        stats.batch_seconds.setdefault(1, Window()).update(0.010)
    stats.batch_seconds.setdefault(8, Window()).update(0.020)  # batching pays: less than 8 x 10 ms
    assert stats.seconds_for(8, fallback=0.010) == 0.020


def test_a_worker_that_finishes_a_batch_starts_the_queued_one_without_the_event_loop() -> None:
    # Handing every batch over through the event loop left a worker idle for a median 3.7 ms
    # between batches at concurrency 8 (MobileNet, quiet 2-core VM: 7 % of its time; 8 % of the
    # CPU idle with batches of one): the loop had to wake, start the batch and wake a thread
    # again while it also parsed requests. Here the loop is held (as a busy loop would be) when
    # the first batch ends: the queued batch must start all the same.
    async def test() -> None:
        session, lane = RecordingSession(), InferenceLane()
        batcher = make_batcher(session, lane, max_wait_s=0.0)
        batcher.start()
        second_began = threading.Event()
        try:
            session.gate.clear()
            first = asyncio.create_task(batcher.infer(images(1), None))
            await asyncio.to_thread(session.entered.wait, 10)
            later = asyncio.create_task(batcher.infer(images(2, 3), None))
            await asyncio.sleep(0.05)
            assert batcher.pending == 2
            session.entered.clear()
            threading.Thread(target=lambda: second_began.set() if session.entered.wait(10) else None).start()
            session.gate.set()
            began_without_loop = second_began.wait(10)  # blocks the event loop meanwhile
            answers = await asyncio.wait_for(asyncio.gather(first, later), 10)
            assert began_without_loop
            assert session.batch_sizes == [1, 2]
            assert [[r.logits[0] for r in answer] for answer in answers] == [[1], [2, 3]]
            assert await given_back(lane) and batcher.running == 0
        finally:
            session.gate.set()
            await batcher.close()
            lane.shutdown()

    asyncio.run(test())


def test_an_abandoned_request_behind_others_gives_its_queue_places_back_at_once() -> None:
    # A client that goes away frees its places at once, wherever its images are in the queue.
    # With the images compared by value (as arrays) rather than by identity, removing one that was
    # not first raised inside deque.remove and the places stayed taken until the batch came.
    async def test(session: RecordingSession, batcher: Batcher) -> None:
        session.gate.clear()
        photo = [np.full((2,), v, dtype=np.float32) for v in (1, 2, 3, 4)]
        running = asyncio.create_task(batcher.infer(photo[:1], None))
        await asyncio.to_thread(session.entered.wait, 10)
        ahead = asyncio.create_task(batcher.infer(photo[1:2], None))
        abandoned = asyncio.create_task(batcher.infer(photo[2:], None))
        await asyncio.sleep(0.05)
        assert batcher.pending == 3
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert batcher.pending == 1
        session.gate.set()
        await asyncio.wait_for(asyncio.gather(running, ahead), 10)

    asyncio.run(_with_batcher(test, max_wait_s=0.0))


def test_a_backlog_estimate_takes_each_sizes_median_once_not_once_per_queued_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop predicts a request's wait several times on its way in (admission, deadline,
    `auto`), and each prediction dispatched every queued image in turn, taking the median of every
    batch size's recent runs for each: with 30 images queued at MobileNet-160's 140 requests a
    second, py-spy found those medians in 15 % of the samples where a thread held the GIL, while
    the CPU stood 4 % idle. The medians change only when a run is recorded."""
    session, lane = RecordingSession(), InferenceLane(workers=2)
    batcher = make_batcher(session, lane, max_wait_s=0.01, max_batch_s=0.5)
    measured(batcher.stats, 1, 0.006)
    measured(batcher.stats, 4, 0.020)
    batcher.reserved = 30  # places held by requests decoding: queued ahead of the next one
    medians_taken = 0
    real_median = statistics.median

    def counting_median(values: Any) -> Any:
        nonlocal medians_taken
        medians_taken += 1
        return real_median(values)

    monkeypatch.setattr(statistics, "median", counting_median)
    first = batcher.backlog_seconds()
    for _ in range(5):
        assert batcher.backlog_seconds() == first
    assert medians_taken <= 2  # one per batch size measured, once
    for _ in range(TRUSTED_RUNS + 1):  # new runs, slower: the estimate follows them
        batcher.stats.batch_seconds[4].update(0.040)
    assert batcher.backlog_seconds() > first
    assert sorted(batcher._dispatch(-1, [0.0, 0.0])) == [0.0, 0.0]  # fewer than none: no batch
    lane.shutdown()
