"""The transport-independent core: images in, calibrated labels out. No HTTP here."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.errors import DeadlineExceeded
from service.imaging import preprocess
from service.metrics import Metrics
from service.registry import LoadedModel


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    confidence: float


@dataclass
class Timings:
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float = 0.0


@dataclass
class Outcome:
    model: LoadedModel
    predictions: list[Prediction]
    timings: Timings
    batch_sizes: list[int]


def calibrated(logits: np.ndarray, temperature: float, labels: list[str]) -> Prediction:
    scaled = logits.astype(np.float64) / temperature
    exp = np.exp(scaled - scaled.max())
    probs = exp / exp.sum()
    best = int(probs.argmax())
    return Prediction(labels[best], {label: float(p) for label, p in zip(labels, probs, strict=True)},
                      float(probs[best]))


async def decode_all(blobs: list[bytes], size: tuple[int, int], max_pixels: int, executor: Executor) -> list[np.ndarray]:
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(executor, preprocess, b, size, max_pixels) for b in blobs)))


async def run_model(model: LoadedModel, blobs: list[bytes], *, deadline: float | None, max_pixels: int,
                    decode_executor: Executor, metrics: Metrics) -> Outcome:
    """Decode for this model's input size, then infer through its batcher."""
    start = time.monotonic()
    arrays = await decode_all(blobs, model.size, max_pixels, decode_executor)
    decoded = time.monotonic()
    metrics.decode_seconds.labels(model.entry.name).observe(decoded - start)
    if deadline is not None:
        predicted = model.batcher.backlog_seconds() + model.batcher.stats.seconds_for(1, model.batcher.fallback_seconds)
        if decoded + predicted > deadline:
            raise DeadlineExceeded(
                f"deadline cannot be met by {model.entry.name}: about {predicted * 1000:.1f} ms of "
                f"queue and inference remain, {max(0.0, (deadline - decoded) * 1000):.1f} ms left"
            )
    results = await model.batcher.infer(arrays, deadline)
    queue_s = max(r[1] for r in results)
    inference_s = max(r[2] for r in results)
    metrics.queue_seconds.labels(model.entry.name).observe(queue_s)
    metrics.images.labels(model.entry.name).inc(len(results))
    entry = model.entry
    predictions = [calibrated(r[0], entry.temperature, entry.labels) for r in results]
    for p in predictions:
        metrics.confidence.labels(entry.name).observe(p.confidence)
    timings = Timings((decoded - start) * 1000, queue_s * 1000, inference_s * 1000)
    return Outcome(model, predictions, timings, [r[3] for r in results])
