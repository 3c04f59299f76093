"""The transport-independent core: images in, calibrated labels out. No HTTP here.

Three ways to answer: a named model, `auto` (the server picks by latency budget and accuracy
floor) and `cascade` (small model first, large one only for the images the small one is unsure of).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from catdog_core.probabilities import softmax
from service.batching import Reservation, Window
from service.cache import CachedAnswer, ResponseCache, key_for
from service.errors import BadRequest, DeadlineExceeded, ModelUnavailable, Overloaded, Unsatisfiable
from service.imaging import DecodeLimits, preprocess
from service.metrics import ServiceMetrics
from service.registry import LoadedModel, ModelRegistry
from service.selection import Candidate, choose_auto, needs_escalation
from service.shadow import Sample, ShadowWatch

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    confidence: float


@dataclass
class ImageAnswer:
    prediction: Prediction
    model: str
    confidences: dict[str, float]  # every model that looked at this image
    escalated: bool = False
    degraded: bool = False
    cached: bool = False  # answered from the response cache, not a fresh inference


@dataclass
class Timings:
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0

    def add(self, other: Timings) -> None:
        self.decode_ms += other.decode_ms
        self.queue_ms += other.queue_ms
        self.inference_ms += other.inference_ms


@dataclass
class Answer:
    mode: str  # "model", "auto" or "cascade"
    name: str  # the model that answered, or "cascade"
    answers: list[ImageAnswer]
    models_run: list[str]
    timings: Timings
    batch_sizes: list[int]
    selection: dict[str, object] = field(default_factory=dict)


@dataclass
class _Run:
    predictions: list[Prediction]
    timings: Timings
    batch_sizes: list[int]  # of the batches that ran this request's images (cache hits ran in none)
    cached: list[bool]  # per image: answered from the response cache


def calibrated(logits: np.ndarray, temperature: float, labels: list[str]) -> Prediction:
    probs = softmax(logits, temperature)
    best = int(probs.argmax())
    return Prediction(
        labels[best], {label: float(p) for label, p in zip(labels, probs, strict=True)}, float(probs[best])
    )


class Classifier:
    def __init__(
        self,
        registry: ModelRegistry,
        decode_executor: Executor,
        metrics: ServiceMetrics,
        limits: DecodeLimits,
        decode_threads: int,
        cache: ResponseCache | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.shadow: ShadowWatch | None = None  # set by the app when CATDOG_SHADOW_RATE > 0
        self._decode_executor = decode_executor
        self._metrics = metrics
        self._limits = limits
        self._decode_threads = decode_threads
        self._decode_seconds = {name: Window() for name in registry.names()}  # per image

    # -- predictions -------------------------------------------------------------------------

    def predicted_seconds(self, model: LoadedModel, n_images: int, own: Reservation | None = None) -> float:
        """Decode + wait for the shared inference thread + this model's own inference (`own`: the
        queue places this request already holds)."""
        decode = (self._decode_seconds[model.entry.name].value or 0.0) * math.ceil(
            n_images / self._decode_threads
        )
        batcher = model.batcher
        return decode + self.registry.backlog_seconds(model, own) + batcher.inference_seconds(n_images)

    # -- the three modes -----------------------------------------------------------------------

    async def direct(self, name: str | None, blobs: list[bytes], deadline: float | None) -> Answer:
        model = self.registry.get(name)
        run = await self._run(model, blobs, deadline)
        answers = [
            ImageAnswer(p, model.entry.name, {model.entry.name: p.confidence}, cached=hit)
            for p, hit in zip(run.predictions, run.cached, strict=True)
        ]
        self._offer_shadow(answers, blobs)
        return Answer("model", model.entry.name, answers, [model.entry.name], run.timings, run.batch_sizes)

    async def auto(
        self,
        blobs: list[bytes],
        deadline: float | None,
        max_latency_ms: float | None,
        min_accuracy: float | None,
    ) -> Answer:
        budget_ms = max_latency_ms
        if deadline is not None:  # a deadline is a latency budget too
            remaining_ms = (deadline - time.monotonic()) * 1000
            budget_ms = remaining_ms if budget_ms is None else min(budget_ms, remaining_ms)
        candidates = [
            Candidate(
                name,
                m.entry.test.hardest_source[1] if m.entry.test else None,
                self.predicted_seconds(m, len(blobs)) * 1000,
            )
            for name, m in self.registry.models.items()
        ]
        try:
            choice = choose_auto(candidates, budget_ms, min_accuracy)
        except Unsatisfiable as unsatisfiable:
            if budget_ms == max_latency_ms:
                raise
            # The deadline, not the caller's constraints, rules every model out: time ran out,
            # which is a 504 like any missed deadline (the 422 is for constraints no wait can meet).
            try:
                choose_auto(candidates, max_latency_ms, min_accuracy)
            except Unsatisfiable:
                raise unsatisfiable from None
            raise DeadlineExceeded(
                f"no model that meets the request's constraints can answer within its "
                f"deadline ({budget_ms:.0f} ms left); {unsatisfiable.message}"
            ) from None
        self._metrics.selections.labels("auto", choice.candidate.name, choice.reason).inc()
        start = time.monotonic()
        answer = await self.direct(choice.candidate.name, blobs, deadline)
        actual_ms = (time.monotonic() - start) * 1000
        if budget_ms is not None and actual_ms > budget_ms:
            self._metrics.budget_misses.labels(choice.candidate.name).inc()
        answer.mode = "auto"
        answer.selection = {
            "reason": choice.reason,
            "predicted_ms": round(choice.candidate.predicted_ms, 3),
            "actual_ms": round(actual_ms, 3),
            "budget_ms": budget_ms,
            "min_accuracy": min_accuracy,
        }
        return answer

    def resolve_cascade(self, pair: str | None, min_confidence: float | None) -> tuple[str, str, float]:
        """(small, large, threshold): the manifest's calibrated cascade, or any pair with a threshold."""
        calibrated_pairs = {(c.small, c.large): c.threshold for c in self.registry.manifest.cascades}
        if pair is None:
            if not calibrated_pairs:
                raise BadRequest("the manifest defines no cascade; name one with cascade=small,large")
            small, large = next(iter(calibrated_pairs))
        else:
            names = [part.strip() for part in pair.split(",")]
            if len(names) != 2:
                raise BadRequest("cascade must be two model names: cascade=small,large")
            small, large = (self.registry.get(n).entry.name for n in names)
        if min_confidence is not None:
            return small, large, min_confidence
        if (small, large) not in calibrated_pairs:
            known = ", ".join(",".join(p) for p in calibrated_pairs) or "none"
            raise BadRequest(
                f"no calibrated threshold for cascade {small},{large}: pass min_confidence, "
                f"or use a calibrated pair ({known})"
            )
        return small, large, calibrated_pairs[(small, large)]

    async def cascade(
        self, blobs: list[bytes], deadline: float | None, pair: str | None, min_confidence: float | None
    ) -> Answer:
        small_name, large_name, threshold = self.resolve_cascade(pair, min_confidence)
        small, large = self.registry.get(small_name), self.registry.get(large_name)
        first = await self._run(small, blobs, deadline)
        answers = [
            ImageAnswer(p, small.entry.name, {small.entry.name: p.confidence}, cached=hit)
            for p, hit in zip(first.predictions, first.cached, strict=True)
        ]
        unsure = [i for i, p in enumerate(first.predictions) if needs_escalation(p.confidence, threshold)]
        timings, batch_sizes, models_run = first.timings, list(first.batch_sizes), [small.entry.name]
        second: _Run | None = None
        if unsure and (
            deadline is None or time.monotonic() + self.predicted_seconds(large, len(unsure)) <= deadline
        ):
            try:
                second = await self._run(large, [blobs[i] for i in unsure], deadline)
            except (Overloaded, DeadlineExceeded, ModelUnavailable) as exc:
                # The small model's answers are already paid for: return them marked degraded
                # rather than throw them away with a 503/504.
                log.info(
                    "cascade escalation to %s failed (%s); answering degraded", large.entry.name, exc.code
                )
        if unsure and second is None:
            for i in unsure:  # no time or no room for the large model: say so instead of failing
                answers[i].degraded = True
            self._metrics.degraded.labels("cascade").inc()
        elif second is not None:
            timings.add(second.timings)
            batch_sizes += second.batch_sizes
            models_run.append(large.entry.name)
            self._metrics.escalations.labels(small.entry.name, large.entry.name).inc(len(unsure))
            for i, prediction, hit in zip(unsure, second.predictions, second.cached, strict=True):
                answers[i] = ImageAnswer(
                    prediction,
                    large.entry.name,
                    {**answers[i].confidences, large.entry.name: prediction.confidence},
                    escalated=True,
                    cached=answers[i].cached and hit,
                )
        reason = (
            "degraded"
            if any(a.degraded for a in answers)
            else "escalated"
            if len(models_run) > 1
            else "confident"
        )
        self._metrics.selections.labels("cascade", answers[0].model, reason).inc()
        self._offer_shadow(answers, blobs)
        return Answer(
            "cascade",
            "cascade",
            answers,
            models_run,
            timings,
            batch_sizes,
            {"reason": reason, "threshold": threshold, "small": small.entry.name, "large": large.entry.name},
        )

    def _offer_shadow(self, answers: list[ImageAnswer], blobs: list[bytes]) -> None:
        # Cached answers were fresh once; comparing the same bytes again would tell nothing new.
        if self.shadow is not None:
            self.shadow.offer(
                [
                    Sample(a.model, a.prediction.label, a.prediction.confidence, blob)
                    for a, blob in zip(answers, blobs, strict=True)
                    if not a.cached
                ]
            )

    # -- one model -----------------------------------------------------------------------------

    async def _run(self, model: LoadedModel, blobs: list[bytes], deadline: float | None) -> _Run:
        """The model's answers: from the response cache where it has them, the rest inferred."""
        if self.cache is None:
            return await self._infer(model, blobs, deadline)
        entry = model.entry
        keys = [key_for(blob, entry.name, entry.version) for blob in blobs]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, hit in enumerate(found) if hit is None]
        fresh = await self._infer(model, [blobs[i] for i in missing], deadline) if missing else None
        predictions: list[Prediction] = []
        fresh_predictions = iter(fresh.predictions if fresh else [])
        for key, hit in zip(keys, found, strict=True):
            if hit is None:
                prediction = next(fresh_predictions)
                self.cache.put(key, _to_cached(prediction))
            else:
                prediction = Prediction(hit.label, dict(hit.probabilities), hit.confidence)
            predictions.append(prediction)
        timings = fresh.timings if fresh else Timings()
        batch_sizes = fresh.batch_sizes if fresh else []
        return _Run(predictions, timings, batch_sizes, [hit is not None for hit in found])

    async def _infer(self, model: LoadedModel, blobs: list[bytes], deadline: float | None) -> _Run:
        """Decode for this model's input size, check the deadline, infer through its batcher."""
        name = model.entry.name
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        # Admission before work: the queue places are held (or 503) and the deadline checked
        # against the prediction before any image is decoded.
        with model.batcher.reservation(len(blobs)) as held:
            _check_deadline(
                name,
                start,
                self.predicted_seconds(model, len(blobs), held),
                deadline,
                "decoding, queue and inference",
            )
            arrays = list(
                await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            self._decode_executor, preprocess, blob, model.size, self._limits
                        )
                        for blob in blobs
                    )
                )
            )
            decoded = time.monotonic()
            self._metrics.decode_seconds.labels(name).observe(decoded - start)
            self._decode_seconds[name].update(
                (decoded - start) / max(1, math.ceil(len(blobs) / self._decode_threads))
            )
            # The wait for the lane plus this request's own images, all of them, not just one.
            remaining_s = self.registry.backlog_seconds(model, held) + model.batcher.inference_seconds(
                len(arrays)
            )
            _check_deadline(name, decoded, remaining_s, deadline, "queue and inference")
            results = await model.batcher.infer(arrays, deadline, held)
        queue_s = max(r.queue_seconds for r in results)
        inference_s = max(r.inference_seconds for r in results)
        self._metrics.queue_seconds.labels(name).observe(queue_s)
        self._metrics.images.labels(name).inc(len(results))
        predictions = [calibrated(r.logits, model.entry.temperature, model.entry.labels) for r in results]
        for p in predictions:
            self._metrics.confidence.labels(name).observe(p.confidence)
        timings = Timings((decoded - start) * 1000, queue_s * 1000, inference_s * 1000)
        return _Run(predictions, timings, [r.batch_size for r in results], [False] * len(results))


def _to_cached(prediction: Prediction) -> CachedAnswer:
    return CachedAnswer(prediction.label, tuple(prediction.probabilities.items()), prediction.confidence)


def _check_deadline(name: str, now: float, predicted_s: float, deadline: float | None, what: str) -> None:
    """504 now, rather than work that cannot finish in time."""
    if deadline is not None and now + predicted_s > deadline:
        raise DeadlineExceeded(
            f"deadline cannot be met by {name}: about {predicted_s * 1000:.1f} ms of {what} "
            f"predicted, {max(0.0, (deadline - now) * 1000):.1f} ms left"
        )
