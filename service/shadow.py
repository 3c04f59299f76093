"""Live quality watch: the large model checks a sample of the small models' answers, in the
background and only when the inference lane has nothing else to do.

Accuracy can drift with the photos clients send (the models measured 99.4-99.8 % on their own
test split and 97-99 % on photos from another source) and no label arrives to show it. Agreement
with the large model is a label-free signal: for two labels, two models agree exactly when both
are right or both are wrong, so agreement >= 1 - error(small) - error(large). The build's
per-source test accuracies give that floor (`expected_agreement`); live agreement well below it
means the photos are not like the ones the build was measured on.

Never delaying real traffic: a comparison starts only when the inference lane is idle and no
model has images queued or decoding, at most one at a time; otherwise the sample is skipped
(counted), never queued. It does not run on the lane: it has a session of its own for the large
model (one intra-op thread) in a thread at the lowest CPU priority (nice 19), which decodes the
image again at the large model's input size and runs it. A request that arrives meanwhile takes
the lane at once, and the kernel gives the check what CPU the request leaves (a nice-19 thread
weighs 15 against a normal thread's 1024). The cost: that session's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from catdog_core.sessions import OpenVinoPrecision
from service.imaging import DecodeLimits, preprocess
from service.manifest import ModelEntry
from service.metrics import ShadowMetrics
from service.registry import LoadedModel, ModelRegistry
from service.runtime import create_session, warm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One answered image: what the small model said, and the bytes to show the large one."""

    model: str
    label: str
    confidence: float
    data: bytes


def expected_agreement(small: ModelEntry, large: ModelEntry) -> float | None:
    """1 - error(small) - error(large) on the build's hardest source for each: the least agreement
    two-label models with those test accuracies can have (they agree when both are right)."""
    if small.test is None or large.test is None:
        return None
    return max(0.0, small.test.hardest_source[1] + large.test.hardest_source[1] - 1.0)


def default_large_model(registry: ModelRegistry) -> str:
    """The manifest's cascade's large model, else the most accurate model on its hardest source."""
    if registry.manifest.cascades:
        return registry.manifest.cascades[0].large
    return max(
        registry.models,
        key=lambda n: t.hardest_source[1] if (t := registry.models[n].entry.test) is not None else 0.0,
    )


def shadow_session(
    path: Path, providers: list[str], entry: ModelEntry, precision: OpenVinoPrecision = "fp32"
) -> ort.InferenceSession:
    """The large model's session for the checks: one intra-op thread (it runs in the calling,
    low-priority thread), warmed so the first check is not the slow one; precision: OpenVINO's,
    the same as the answers' it checks."""
    session = create_session(path, providers, 1, precision=precision)
    warm(session, entry.input.name, entry.input.height, entry.input.width, [1])
    return session


def _lowest_priority() -> None:
    # On Linux a thread's nice value is its own: PRIO_PROCESS with the thread's id sets only it.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class ShadowWatch:
    def __init__(
        self,
        registry: ModelRegistry,
        large: str,
        session: ort.InferenceSession,
        rate: float,
        limits: DecodeLimits,
        metrics: ShadowMetrics,
        lane_idle: Callable[[], bool],
        chance: Callable[[], float] = random.random,
    ) -> None:
        self._registry = registry
        self.large: LoadedModel = registry.get(large)
        self._session = session  # the large model's own, one intra-op thread: never the lane's
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shadow", initializer=_lowest_priority)
        self.rate = rate
        self._limits = limits
        self._metrics = metrics
        self._lane_idle = lane_idle
        self._chance = chance
        self.running: asyncio.Task[None] | None = None
        for name, model in registry.models.items():
            floor = expected_agreement(model.entry, self.large.entry)
            if name != self.large.entry.name and floor is not None:
                metrics.expected_agreement.labels(name, self.large.entry.name).set(floor)

    def idle(self) -> bool:
        """Nothing running on the lane, nothing queued or decoding for any model."""
        return self._lane_idle() and all(
            m.batcher.pending == 0 and m.batcher.reserved == 0 and m.batcher.running == 0
            for m in self._registry.models.values()
        )

    def offer(self, samples: list[Sample]) -> None:
        """After a request is answered: sample its small-model answers, maybe start one comparison."""
        for sample in samples:
            if sample.model == self.large.entry.name or self._chance() >= self.rate:
                continue
            if (self.running is not None and not self.running.done()) or not self.idle():
                self._count(sample, "skipped_busy")
                continue
            self.running = asyncio.create_task(self._compare(sample), name="shadow")

    def _large_logits(self, data: bytes) -> np.ndarray:
        """Decode and run, in the low-priority thread."""
        entry = self.large.entry
        batch = preprocess(data, self.large.size, self._limits)[None]
        logits: np.ndarray = self._session.run([entry.output.name], {entry.input.name: batch})[0][0]
        return logits

    async def _compare(self, sample: Sample) -> None:
        try:
            loop = asyncio.get_running_loop()
            logits = await loop.run_in_executor(self._executor, self._large_logits, sample.data)
        except Exception:
            log.warning("shadow comparison on %s failed", self.large.entry.name, exc_info=True)
            self._count(sample, "failed")
            return
        entry = self.large.entry
        label = entry.labels[int(np.argmax(logits))]  # a temperature never changes the top class
        if label == sample.label:
            self._count(sample, "agree")
        else:
            self._count(sample, "disagree")
            self._metrics.disagreement_confidence.labels(sample.model).observe(sample.confidence)

    def _count(self, sample: Sample, outcome: str) -> None:
        self._metrics.comparisons.labels(sample.model, self.large.entry.name, outcome).inc()

    async def close(self) -> None:
        if self.running is not None and not self.running.done():
            self.running.cancel()
            await asyncio.gather(self.running, return_exceptions=True)
        self._executor.shutdown(wait=True)
