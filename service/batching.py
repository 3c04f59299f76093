"""Micro-batching with admission control, one batcher per model.

A request's images join the model's queue. The inference lane, shared by every model, runs up to
`workers` batches at once (one, on every core, or one per core of one thread each: README,
"Performance under contention"). When the lane is idle, the queue runs at once: waiting for
company would only add latency, and while that batch runs the next one forms by itself. When the
lane is busy, a batch of up to max_batch_size images starts on a free worker once it is full, or
the oldest has waited max_wait_ms, or waiting longer would break the earliest deadline in it. A
lone image on an idle lane of several one-thread workers may run on a session with every core
instead (LoneImageLayout). A worker that finishes a batch takes the next one from its model's
queue itself, in its own thread, while there is one and no other model's queue waits: handing each
batch over through the event loop left workers idle between batches (Batcher._work). The queue is
bounded: a full queue answers 503 at once with a
Retry-After derived from the measured drain rate, rather than letting latency grow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from service.errors import DeadlineExceeded, ModelUnavailable, Overloaded

log = logging.getLogger(__name__)

T = TypeVar("T")


class InferenceLane:
    """The threads that run session.run for every model: `workers` batches at once, and how many
    are running. One worker with every core as intra-op threads is the classic layout; several
    workers of one intra-op thread each keep running when a core is taken away, and a spare one
    beyond the cores keeps them busy while another waits between batches (README, "Performance
    under contention")."""

    def __init__(
        self, workers: int = 1, balanced: bool = False, every_core_threads: int | None = None, spare: int = 0
    ) -> None:
        self.workers = workers
        # Intra-op threads of a session that runs a lone image on every core (LoneImageLayout):
        # the CPUs (spare workers outnumber them), else one per worker.
        self.every_core_threads = every_core_threads or workers
        # Workers beyond one per CPU, which only models of short runs use (Batcher's max_running).
        self.spare = spare
        # A freed worker takes its share of a model's queue, not all of it (Batcher.share_of_queue).
        self.balanced = balanced
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="inference")
        self.submitted = 0  # batches claimed and not yet finished
        self._listeners: list[asyncio.Event] = []
        self._queues: list[collections.deque[_Job]] = []  # every model's queue

    @property
    def idle(self) -> bool:
        return self.submitted == 0

    @property
    def free(self) -> bool:
        """A worker is free to start a batch now."""
        return self.submitted < self.workers

    def listen(self, event: asyncio.Event, queue: collections.deque[_Job]) -> None:
        """Set `event` whenever a worker becomes free (a batcher waiting for one wakes up); `queue`
        is that model's queue, which a worker going on with another model's batches gives way to."""
        self._listeners.append(event)
        self._queues.append(queue)

    def others_waiting(self, queue: collections.deque[_Job]) -> bool:
        """Another model has images queued: a worker should return to the event loop, which shares
        the workers between models, rather than take `queue`'s next batch itself. Read from worker
        threads: each deque's length is read atomically."""
        return any(other for other in self._queues if other is not queue)

    def claim(self, workers: int = 1) -> None:
        """Take workers, synchronously, before the batch's task starts: the next batch decision
        sees them taken. A batch that uses every core claims every worker."""
        self.submitted += workers

    async def run(self, work: Callable[[], T], workers: int = 1) -> T:
        """Run `work` on the workers claimed for it, and free them when it is done."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self.submitted -= workers
            for event in self._listeners:
                event.set()

    def run_and_wait(self, work: Callable[[], T]) -> T:
        """Run `work` on a worker thread and wait for it, from a thread other than the event
        loop's: warm-up. onnxruntime's CUDA provider keeps some state per calling thread: warmed
        on the loader's thread, the inference thread's first batch of one took 2.5-320 ms (every
        later one under 2.5) and 8 of 714 batches stalled over 0.3 s; warmed here, 2 of 1,235
        (H200, README "GPU"; the rest were replans, see registry._session_per_padded_size). On
        CUDA the lane has one worker, so this is that thread; on CPU, where nothing measured
        depends on the thread, any of them."""
        return self._executor.submit(work).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class Inferred:
    """One image's answer from the batcher, and where its time went."""

    logits: np.ndarray
    queue_seconds: float  # enqueued until its session.run began, waiting for other models included
    inference_seconds: float  # its batch's session.run alone, timed in the inference thread
    batch_size: int


@dataclass(frozen=True, eq=False)
class _Running:
    """A batch on the lane: its size, when it was handed over (its wait for a thread included),
    its predicted run time and the workers it holds."""

    size: int
    began: float
    predicted: float
    workers: int = 1


@dataclass(eq=False)  # a job is itself: compared by value, its array would be compared too
class _Job:
    array: np.ndarray
    future: asyncio.Future[Inferred]
    enqueued: float
    deadline: float | None


class Window:
    """The last few observations; their median is a live p50 that ignores the odd outlier."""

    def __init__(self, size: int = 64) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=size)
        self.updates = 0  # how many samples it has taken: a full window's length stops changing

    def update(self, sample: float) -> None:
        self.samples.append(sample)
        self.updates += 1

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


ONE_CORE, EVERY_CORE = "one_core", "every_core"


class LoneImageLayout:
    """Where a lone image runs when the lane is idle: on a worker's one thread, or on a session
    with every core. With several one-thread workers a batch that loses its core slows only
    itself, but a lone image on a quiet machine then leaves the other cores idle (at concurrency 1,
    one core against every core: MobileNet 28 against 22 ms p50, Xception 292 against 157 ms;
    README, "Performance under contention"). Which is faster
    depends on what else the machine does (with a core taken, every core can be slower), so it is
    measured, not assumed: the layout with the lower median of its recent lone runs wins, and the
    other runs one lone image once `explore_after_s` have passed since it last ran, so that a
    change is noticed within seconds at the price of one slower answer now and then."""

    def __init__(
        self,
        one_core_s: float,
        every_core_s: float,
        explore_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = {ONE_CORE: Window(8), EVERY_CORE: Window(8)}
        self.seconds[ONE_CORE].update(one_core_s)
        self.seconds[EVERY_CORE].update(every_core_s)
        self.explore_after_s = explore_after_s
        self._clock = clock
        self._last_run = dict.fromkeys(self.seconds, clock())

    def faster(self) -> str:
        return min(self.seconds, key=lambda layout: self.seconds[layout].value or 0.0)

    def choose(self) -> str:
        best = self.faster()
        other = EVERY_CORE if best == ONE_CORE else ONE_CORE
        now = self._clock()
        chosen = other if now - self._last_run[other] >= self.explore_after_s else best
        self._last_run[chosen] = now
        return chosen

    def record(self, layout: str, seconds: float) -> None:
        self.seconds[layout].update(seconds)


def deal(free_in: list[float], images: int, per_image: float) -> tuple[list[float], list[int]]:
    """Images dealt one by one, each to the worker that would finish it first (ties: the earlier
    in the list): the workers' free times afterwards, and how many images each got."""
    heap = [(free, worker) for worker, free in enumerate(free_in)]
    heapq.heapify(heap)
    counts = [0] * len(free_in)
    for _ in range(images):
        free, worker = heap[0]
        heapq.heapreplace(heap, (free + per_image, worker))
        counts[worker] += 1
    return [free for free, _ in heap], counts


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a padded batch can have: powers of two below max_batch, and max_batch."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return [*sizes, max_batch]


def pad_batch(batch: np.ndarray, buckets: list[int]) -> np.ndarray:
    """The batch with blank images appended up to the smallest bucket that holds it."""
    size = next(b for b in buckets if b >= len(batch))
    blanks = np.zeros((size - len(batch), *batch.shape[1:]), dtype=batch.dtype)
    return np.concatenate([batch, blanks]) if len(blanks) else batch


TRUSTED_RUNS = 3  # runs at a batch size before their median alone is its estimate


@dataclass
class BatchStats:
    batch_seconds: dict[int, Window] = field(default_factory=dict)  # per batch size
    # The medians as of the windows' update counts: the event loop predicts waits several times
    # per request, each over every queued image, and the medians change only with a new run.
    _medians: tuple[tuple[tuple[int, int], ...], dict[int, float], dict[int, float]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def seconds_for(self, batch: int, fallback: float) -> float:
        """Estimated session.run time for a batch: its own median once run TRUSTED_RUNS times;
        else scaled from the nearest size that has been (or, before any has, from any size
        measured, else the warm-up's figure), or its own few runs where those are faster.

        A size's first run or two may be a stall (a CPU hiccup; on CUDA a convolution replanned).
        Taken as the estimate, one stall would put the size above the batch limit, so it would
        never run again to correct it, and admission would refuse on the predicted waits. Batch
        one is never excluded, so its runs become trusted soon and bound the others."""
        reference, medians = self._reference()
        if batch in reference:
            return reference[batch]
        if not reference:
            return fallback * batch
        nearest = min(reference, key=lambda b: abs(b - batch))
        scaled = reference[nearest] * batch / nearest
        return min(scaled, medians[batch]) if batch in medians else scaled

    def _reference(self) -> tuple[dict[int, float], dict[int, float]]:
        """The trusted medians (or, before any size is trusted, all of them) and all the medians,
        taken again only when a window has taken a sample since."""
        windows = list(self.batch_seconds.items())  # one C call: workers record while we read
        key = tuple((size, window.updates) for size, window in windows)
        cached = self._medians
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        # A run recorded after `key` was read may be in these samples: the next call, seeing the
        # new count, takes the medians again, so the estimate is never more than one run behind.
        runs = {b: list(w.samples) for b, w in windows if w.samples}
        medians = {b: statistics.median(r) for b, r in runs.items()}
        trusted = {b: m for b, m in medians.items() if len(runs[b]) >= TRUSTED_RUNS}
        self._medians = (key, trusted or medians, medians)
        return trusted or medians, medians


@dataclass
class Reservation:
    """Queue places held for one request from before its images are decoded until they are
    queued, so admission is decided before the work (decoding) is done."""

    places: int


class Batcher:
    def __init__(
        self,
        name: str,
        session: ort.InferenceSession,
        *,
        input_name: str,
        output_name: str,
        max_batch: int,
        max_wait_s: float,
        capacity: int,
        lane: InferenceLane,
        fallback_seconds: float,
        max_queue_wait_s: float | None = None,
        max_batch_s: float | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        every_core: tuple[ort.InferenceSession, LoneImageLayout] | None = None,
        on_lone_image: Callable[[str], None] | None = None,
        batch_buckets: dict[int, ort.InferenceSession] | None = None,
        max_running: int | None = None,
    ) -> None:
        """batch_buckets: pad every batch with blank images up to the next of these sizes and run
        it on that size's own session (on CUDA, where a convolution plans again whenever its
        input shape changes: each session only ever sees the one shape it was warmed at).
        max_running: most of this model's batches on the lane at once (None: one per worker); a
        model of long runs is kept off the lane's spare workers this way (registry)."""
        self.name = name
        self._session = session
        self._input = input_name
        self._outputs = [output_name]
        self.max_batch = max_batch
        self.max_batch_s = max_batch_s
        self.max_wait_s = max_wait_s
        self.max_queue_wait_s = max_queue_wait_s
        self.capacity = capacity
        self._lane = lane
        self._queue: collections.deque[_Job] = collections.deque()
        # The queue and the running batches, shared by the event loop and the workers that go on
        # with the next batch themselves (_work).
        self._lock = threading.Lock()
        self._wakeup = asyncio.Event()
        lane.listen(self._wakeup, self._queue)  # a worker freed may be the one this queue waits for
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # this model's batches running on the lane
        self._closing = False
        self._running_batches: list[_Running] = []  # this model's batches on the lane right now
        self.stats = BatchStats()
        self.failure: BaseException | None = None  # why the worker stopped, if it crashed
        self.reserved = 0  # queue places held by requests still decoding
        self.fallback_seconds = fallback_seconds  # per image, timed at warm-up, until batches measure it
        self._on_batch = on_batch
        # A session of the same model with every core as intra-op threads, for lone images.
        self._every_core = every_core
        self._on_lone_image = on_lone_image
        self._bucket_sessions = batch_buckets or {}
        self._buckets = sorted(self._bucket_sessions) or None
        self._max_running = max_running

    @property
    def batch_limit(self) -> int:
        """The largest batch whose predicted run time fits max_batch_s (never below one image):
        a slow model on one thread runs smaller batches, so an admitted request is not held for
        seconds by the images batched with it, where batching would gain it little anyway."""
        if self.max_batch_s is None:
            return self.max_batch
        for size in range(self.max_batch, 1, -1):
            if self.stats.seconds_for(size, self.fallback_seconds) <= self.max_batch_s:
                return size
        return 1

    @property
    def running(self) -> int:
        """Images in this model's batches on the lane right now."""
        return sum(batch.size for batch in self._running_batches)

    @property
    def workers(self) -> int:
        """The lane's workers this model may use at once."""
        return min(self._lane.workers, self._max_running or self._lane.workers)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._supervise)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """A worker that stops without being closed has crashed: record why, fail what is queued
        (rather than leave it hanging), and let readiness and liveness report it."""
        if task.cancelled():
            self._crashed(RuntimeError("the batcher task was cancelled"))
        elif (error := task.exception()) is not None:
            self._crashed(error)
        elif not self._closing:
            self._crashed(RuntimeError("the batcher task returned unexpectedly"))

    def _batch_done(self, jobs: list[_Job], task: asyncio.Task[None]) -> None:
        """A batch task ends by answering its jobs; one that raises is a bug, handled as a crash,
        and its own jobs fail with the queued ones rather than wait for nobody."""
        self._batches.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        self._crashed(error)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(self._unavailable())

    def _crashed(self, failure: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        if self._task is not None and not self._task.done():
            self._task.cancel()  # no batch may start after a crash
        log.critical(
            "batcher for %s crashed; its requests now fail with 503 until the process restarts",
            self.name,
            exc_info=self.failure,
        )
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(self._unavailable())

    def _unavailable(self) -> ModelUnavailable:
        return ModelUnavailable(
            f"model {self.name} is unavailable: its batcher crashed ({self.failure!r}); "
            "the server reports not live and should be restarted",
            headers={"Retry-After": "5"},
        )

    def backlog_seconds(self, own: Reservation | None = None) -> float:
        """Predicted time until a newly queued image would start running: behind this model's
        running batches and the images queued or still decoding, which were admitted first and
        queue first (`own`: the places this request holds itself, not ahead of it)."""
        queued = self.pending + self.reserved - (own.places if own else 0)
        return min(self._dispatch(queued, self._workers_free_in()))

    def inference_seconds(self, n_images: int) -> float:
        """Predicted run time of one request's n images, from free workers to the last answer."""
        return max(self._dispatch(n_images, [0.0] * self.workers))

    def _workers_free_in(self) -> list[float]:
        """Seconds until each worker is free: a running batch's predicted time less what it has
        run already (never below zero), and zero for the workers this model is not using."""
        now = time.monotonic()
        busy = [
            max(0.0, b.predicted - (now - b.began)) for b in self._running_batches for _ in range(b.workers)
        ]
        return busy + [0.0] * max(0, self.workers - len(busy))

    def _dispatch(self, images: int, free_in: list[float]) -> list[float]:
        """The workers' free times after `images` queued images have run, dispatched as the
        worker loop does: balanced, each image to the worker that would finish it first;
        otherwise whichever worker frees first takes up to batch_limit of them."""
        limit = self.batch_limit
        if self._lane.balanced and images:
            return deal(free_in, images, self._seconds_per_image(min(images, limit)))[0]
        heap = list(free_in)
        heapq.heapify(heap)
        full_batches, last = divmod(max(0, images), limit)  # none queued: nothing to add
        sizes = [limit] * full_batches + ([last] if last else [])
        run_seconds = {size: self.stats.seconds_for(size, self.fallback_seconds) for size in set(sizes)}
        for size in sizes:
            heapq.heappush(heap, heapq.heappop(heap) + run_seconds[size])
        return heap

    def share_of_queue(self, limit: int, claimed: bool = False) -> int:
        """How many queued images a freed worker takes: its share when they are dealt out one by
        one, each to the worker that would finish it first (this model's busy workers count from
        when their batch is predicted to end; workers busy with another model's batch not at all).
        Taking the whole queue leaves the other workers idle while this one runs the lot, and on
        one thread per image a bigger batch saves nothing while every image in it waits for the
        last (README, "Performance under contention"). claimed: this worker is still counted as
        taken (a worker thread going on with the next batch, _work)."""
        now = time.monotonic()
        others = [max(0.0, b.predicted - (now - b.began)) for b in self._running_batches if b.workers == 1]
        # Free workers besides this one: the lane's, and those this model may still use (its
        # running batches never include this worker's, not started yet or just finished).
        lane_free = self._lane.workers - self._lane.submitted - (0 if claimed else 1)
        model_free = self.workers - len(self._running_batches) - 1
        others += [0.0] * max(0, min(lane_free, model_free))
        per_image = self._seconds_per_image(max(1, min(self.pending, limit)))
        _, taken = deal([0.0, *others], self.pending, per_image)  # this worker first: it wins ties
        return max(1, min(taken[0], limit))

    def _seconds_per_image(self, batch: int) -> float:
        return self.stats.seconds_for(batch, self.fallback_seconds) / batch

    def next_batch_seconds(self) -> float:
        """Predicted run time of the batch this model will run next (0 when idle): images still
        decoding count, as they will be queued before long."""
        waiting = self.pending + self.running + self.reserved
        return (
            self.stats.seconds_for(min(waiting, self.batch_limit), self.fallback_seconds) if waiting else 0.0
        )

    def retry_after_seconds(self) -> int:
        """When the queue will have room again: the same latency model as deadlines and auto."""
        return max(1, math.ceil(self.backlog_seconds()))

    def _check_serving(self) -> None:
        if self.failure is not None:
            raise self._unavailable()
        if self._closing:
            raise Overloaded("server is shutting down", headers={"Retry-After": "1"})

    def _admit(self, n_images: int) -> None:
        self._check_serving()
        if (refused := self.refusal(n_images)) is not None:
            raise refused

    def refusal(self, n_images: int = 1) -> Overloaded | None:
        """The 503 a request of n images would get now for want of room (None: it fits). Asked
        with one image before a request's body is read, too: no request for this model fits then."""
        if self.pending + self.reserved + n_images > self.capacity:
            return Overloaded(
                f"model {self.name} queue is full ({self.pending} queued and {self.reserved} decoding of "
                f"{self.capacity} places)",
                headers={"Retry-After": str(self.retry_after_seconds())},
            )
        wait = self.backlog_seconds()
        if (
            self.max_queue_wait_s is not None
            and self.pending + self.reserved > 0
            and wait > self.max_queue_wait_s
        ):
            # Places are free, but the images ahead take longer than the cap to run. With nothing
            # queued ahead (only a running batch) a request is always taken, so the next batch
            # can form while one runs, however slow the model.
            return Overloaded(
                f"model {self.name} would start this request in about {wait:.1f} s, past the "
                f"{self.max_queue_wait_s:g} s queue-wait cap",
                headers={"Retry-After": str(self.retry_after_seconds())},
            )
        return None

    @contextlib.contextmanager
    def reservation(self, n_images: int) -> Iterator[Reservation]:
        """Hold n places (503 now if they are not free); whatever infer() has not taken is given
        back when the block ends, on every path out of it."""
        self._admit(n_images)
        held = Reservation(n_images)
        self.reserved += n_images
        try:
            yield held
        finally:
            self.reserved -= held.places

    async def infer(
        self, arrays: list[np.ndarray], deadline: float | None, reservation: Reservation | None = None
    ) -> list[Inferred]:
        """Logits per image, with its queue wait, inference time and batch size."""
        if reservation is not None and reservation.places >= len(arrays):
            # The places were held since admission: they become queued jobs now, unless the worker
            # died or began closing meanwhile (queued then, they would wait for nobody).
            self._check_serving()
            reservation.places -= len(arrays)
            self.reserved -= len(arrays)
        else:
            self._admit(len(arrays))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        jobs = [_Job(a, loop.create_future(), now, deadline) for a in arrays]
        with self._lock:
            self._queue.extend(jobs)
        self._wakeup.set()
        try:
            results = asyncio.gather(*(job.future for job in jobs))
            if deadline is None:
                return list(await results)
            # Bounded: a batch already running past the deadline is not waited for.
            async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
                return list(await results)
        except TimeoutError:
            self._forget(jobs)
            raise DeadlineExceeded("deadline passed before the answer was ready") from None
        except asyncio.CancelledError:
            self._forget(jobs)  # the request was abandoned (client gone)
            raise

    def _forget(self, jobs: list[_Job]) -> None:
        """Free an abandoned request's queue places at once; a job already taken into a batch is
        skipped there, because its future is done (cancelled)."""
        with self._lock:
            for job in jobs:
                with contextlib.suppress(ValueError):
                    self._queue.remove(job)

    def _batch_ready_at(self) -> float:
        first = self._queue[0]
        ready = first.enqueued + self.max_wait_s
        deadlines = [j.deadline for j in list(self._queue)[: self.batch_limit] if j.deadline is not None]
        if deadlines:  # leave time for the run itself before the earliest deadline
            run = self.stats.seconds_for(min(self.pending, self.batch_limit), self.fallback_seconds)
            ready = min(ready, min(deadlines) - run)
        return ready

    async def _sleep(self, timeout: float | None = None) -> None:
        """Until a job is queued, a lane worker is freed, close() is called, or `timeout` passes."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    async def _run(self) -> None:
        while self._queue or not self._closing:
            with self._lock:  # a worker thread may take from the queue meanwhile
                jobs, delay = self._take_on_loop()
            if not jobs:
                await self._sleep(delay)
                continue
            try:
                self._start_batch(jobs)
            except BaseException:
                self._put_back(jobs)  # a bug: the crash handler fails them rather than lose them
                raise
        if self._batches:
            await asyncio.wait(self._batches)

    def _put_back(self, jobs: list[_Job]) -> None:
        with self._lock:
            self._queue.extendleft(reversed(jobs))

    def _take_on_loop(self) -> tuple[list[_Job], float | None]:
        """Under the lock: the jobs of a batch to start now, or none and how long to sleep (None:
        until woken by a new job, a freed worker or close())."""
        if not self._queue or not self._lane.free or len(self._running_batches) >= self.workers:
            return [], None
        delay = self._batch_ready_at() - time.monotonic()
        limit = self.batch_limit
        if self.pending < limit and delay > 0 and not self._lane.idle and not self._closing:
            return [], delay
        take = self.share_of_queue(limit) if self._lane.balanced else min(self.pending, limit)
        return [self._queue.popleft() for _ in range(take)], None

    def _partition(self, jobs: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The jobs to run, and those whose deadline is past or too near to run; jobs whose client
        went away (future cancelled) are in neither."""
        waiting = [job for job in jobs if not job.future.done()]
        if all(job.deadline is None for job in waiting):  # the usual case: no estimate needed
            return waiting, []
        too_late = time.monotonic() + self.stats.seconds_for(1, self.fallback_seconds)
        live: list[_Job] = []
        expired: list[_Job] = []
        for job in waiting:
            late = job.deadline is not None and job.deadline <= too_late
            (expired if late else live).append(job)
        return live, expired

    @staticmethod
    def _expire(jobs: list[_Job]) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(DeadlineExceeded("deadline passed while queued, or too near to run"))

    def _start_batch(self, jobs: list[_Job]) -> None:
        """Answer what need not run, claim a lane worker for the rest and run them there."""
        live, expired = self._partition(jobs)
        self._expire(expired)
        if not live:
            return
        layout = self._lone_image_layout(live)
        workers = self._lane.workers if layout == EVERY_CORE else 1
        predicted = (
            self._every_core[1].seconds[EVERY_CORE].value or 0.0
            if layout == EVERY_CORE and self._every_core
            else self.stats.seconds_for(len(live), self.fallback_seconds)
        )
        self._lane.claim(workers)
        running = _Running(len(live), time.monotonic(), predicted, workers)
        with self._lock:
            self._running_batches.append(running)
        task = asyncio.create_task(self._run_batch(live, running, layout), name=f"batch-{self.name}")
        self._batches.add(task)
        task.add_done_callback(functools.partial(self._batch_done, live))

    def _lone_image_layout(self, live: list[_Job]) -> str | None:
        """For one image with nothing else running, queued or decoding (on an idle lane the
        other workers would have nothing to do): where it runs. None for every other batch."""
        if self._every_core is None or len(live) != 1 or not self._lane.idle or self.pending or self.reserved:
            return None
        layout = self._every_core[1].choose()
        if self._on_lone_image:
            self._on_lone_image(layout)
        return layout

    async def _run_batch(self, live: list[_Job], running: _Running, layout: str | None) -> None:
        loop = asyncio.get_running_loop()
        await self._lane.run(functools.partial(self._work, loop, live, running, layout), running.workers)

    def _work(
        self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], running: _Running, layout: str | None
    ) -> None:
        """In a worker thread: run the batch, hand its answers to the event loop, and take the
        next batch from the queue at once while there is one (and no other model's queue waits,
        nor the batch held every worker). Going back to the event loop between batches left a
        worker idle for a median 3.7 ms per batch at concurrency 8 (MobileNet, quiet 2-core VM,
        batches of 2.3: 7 % of its time), waiting for a loop busy with requests to start the
        next batch and for the OS to wake a thread again."""
        while True:
            try:
                logits, began, elapsed = self._run_session(jobs, layout)
            except Exception as exc:  # an inference failure is ours, not the client's: surface as 500
                log.exception("inference failed on %s (batch of %d)", self.name, len(jobs))
                self._retire(running)
                loop.call_soon_threadsafe(self._fail, jobs, exc)
                return
            except BaseException as exc:
                self._retire(running)
                loop.call_soon_threadsafe(self._fail, jobs, exc)
                raise
            self._record(len(jobs), layout, elapsed)
            loop.call_soon_threadsafe(self._answer, jobs, logits, began, elapsed)
            if layout == EVERY_CORE:  # it held every worker: the event loop shares them out again
                self._retire(running)
                return
            following = self._next_in_thread(loop, running)
            if following is None:
                return
            jobs, running = following
            layout = None

    def _run_session(self, jobs: list[_Job], layout: str | None) -> tuple[np.ndarray, float, float]:
        """Logits of the jobs' images, when the run began and how long it took (timed here, in
        the inference thread: waiting for the lane is queue time, not inference time)."""
        session = self._every_core[0] if layout == EVERY_CORE and self._every_core else self._session
        batch = np.stack([job.array for job in jobs])
        if self._buckets:
            batch = pad_batch(batch, self._buckets)
        run_on = self._bucket_sessions.get(len(batch), session)
        began = time.monotonic()
        out = run_on.run(self._outputs, {self._input: batch})[0][: len(jobs)]
        return out, began, time.monotonic() - began

    def _record(self, size: int, layout: str | None, elapsed: float) -> None:
        if layout is not None and self._every_core:
            self._every_core[1].record(layout, elapsed)
        if layout != EVERY_CORE:  # the workers' own batch times, which the predictions use
            self.stats.batch_seconds.setdefault(size, Window()).update(elapsed)

    def _retire(self, finished: _Running) -> None:
        with self._lock:
            self._running_batches.remove(finished)

    def _next_in_thread(
        self, loop: asyncio.AbstractEventLoop, finished: _Running
    ) -> tuple[list[_Job], _Running] | None:
        """In a worker thread, its batch done: the next batch it runs at once, or None to give
        the worker back to the event loop. Jobs found expired are answered there."""
        with self._lock:
            self._running_batches.remove(finished)
            while self._queue and self.failure is None and not self._lane.others_waiting(self._queue):
                limit = self.batch_limit
                balanced = self._lane.balanced
                take = self.share_of_queue(limit, claimed=True) if balanced else min(self.pending, limit)
                taken = [self._queue.popleft() for _ in range(take)]
                try:
                    live, expired = self._partition(taken)
                except BaseException:
                    self._queue.extendleft(reversed(taken))  # a bug: failed by the crash handler
                    raise
                if expired:
                    loop.call_soon_threadsafe(self._expire, expired)
                if live:
                    predicted = self.stats.seconds_for(len(live), self.fallback_seconds)
                    running = _Running(len(live), time.monotonic(), predicted)
                    self._running_batches.append(running)
                    return live, running
        return None

    def _answer(self, jobs: list[_Job], logits: np.ndarray, began: float, elapsed: float) -> None:
        """On the event loop: a batch's answers. A failure here is a bug, handled as a crash."""
        try:
            if self._on_batch:
                self._on_batch(len(jobs), elapsed)
        except Exception as error:
            self._crashed(error)
            self._fail(jobs, self._unavailable())
            return
        for job, row in zip(jobs, logits, strict=True):
            if not job.future.done():
                job.future.set_result(Inferred(row, began - job.enqueued, elapsed, len(jobs)))

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    async def close(self) -> None:
        """Stop admitting, finish everything queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:  # a crashed one was logged by _supervise; wait() never raises
            await asyncio.wait([self._task])
        if self._batches:  # a crashed worker leaves its running batches to finish
            await asyncio.wait(self._batches)
