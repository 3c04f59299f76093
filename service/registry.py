"""The loaded models: one onnxruntime session and one batcher each, built at start, never per request."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import onnxruntime as ort
from prometheus_client import Histogram

from catdog_core.hashing import sha256_file
from catdog_core.sessions import OPENVINO, OpenVinoPrecision
from service.batching import Batcher, InferenceLane, LoneImageLayout, Reservation, batch_buckets
from service.errors import ModelNotFound
from service.manifest import Manifest, ModelEntry, load_manifest
from service.metrics import ServiceMetrics
from service.runtime import (
    BatchingInForce,
    check_tensor_names,
    costs_alone_and_in_batch,
    create_session,
    device_of,
    warm,
    warm_at,
)
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    entry: ModelEntry
    session: ort.InferenceSession
    batcher: Batcher
    device: str
    compute_precision: OpenVinoPrecision = "fp32"  # the floating-point layers' (Settings.openvino_precision)

    @property
    def size(self) -> tuple[int, int]:
        return self.entry.input.width, self.entry.input.height

    @property
    def provider(self) -> str:
        """The execution provider that runs it: `device` says cpu for both CPU providers."""
        return str(self.session.get_providers()[0])


ROUTERS = ("auto", "cascade")  # names that pick a model per request rather than being one


class ModelRegistry:
    def __init__(self, manifest: Manifest, models: dict[str, LoadedModel], default: str) -> None:
        if default not in models:
            raise ValueError(f"default model {default!r} is not one of {sorted(models)}")
        self.manifest = manifest
        self.models = models
        self.default = default

    def names(self) -> list[str]:
        return list(self.models)

    def crashed(self) -> list[str]:
        """Models whose batcher has stopped by accident: they can no longer answer."""
        return [name for name, model in self.models.items() if model.batcher.failure is not None]

    def get(self, name: str | None) -> LoadedModel:
        key = name or self.default
        if key not in self.models:
            raise ModelNotFound(f"unknown model; valid names: {', '.join(self.names())}")
        return self.models[key]

    def backlog_seconds(self, target: LoadedModel, own: Reservation | None = None) -> float:
        """Predicted wait before new work on `target` starts running (`own`: the queue places the
        asking request already holds, which are not ahead of it).

        The inference lane is shared and first-come first-served: new work waits for its own
        model's whole queue, and for about one batch of every other busy model, spread over the
        lane's workers.
        """
        others = sum(m.batcher.next_batch_seconds() for m in self.models.values() if m is not target)
        return target.batcher.backlog_seconds(own) + others / target.batcher.workers

    def start(self) -> None:
        for model in self.models.values():
            model.batcher.start()

    async def close(self) -> None:
        for model in self.models.values():
            await model.batcher.close()


def check_models(settings: Settings) -> tuple[Manifest, dict[str, Path]]:
    """Fail fast, before serving: the manifest validates and every file matches its sha256."""
    manifest_path = settings.models_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: build the models first (make models)")
    manifest = load_manifest(manifest_path)
    paths = {name: manifest.path_of(name, manifest_path) for name in manifest.models}
    for name, path in paths.items():
        if not path.exists() or sha256_file(path) != manifest.models[name].sha256:
            raise ValueError(f"{path} is missing or does not match the manifest's sha256; rebuild the models")
    default = settings.default_model or manifest.default_model
    if default not in manifest.models:
        raise ValueError(f"default model {default!r} is not in the manifest: {sorted(manifest.models)}")
    if settings.shadow_model is not None and settings.shadow_model not in manifest.models:
        raise ValueError(
            f"shadow model {settings.shadow_model!r} is not in the manifest: {sorted(manifest.models)}"
        )
    return manifest, paths


def padded_batch_sizes(device: str, max_batch: int) -> list[int] | None:
    """On CUDA the sizes batches are padded to (None: no padding, on CPU, where an image costs
    the same in any batch). A run at a new input shape took 1.5-6.4 s for Xception on an H200
    (cuDNN planning its convolutions; README, "GPU"): with padding only these few shapes ever
    run, each on its own session warmed before /readyz (_session_per_padded_size)."""
    return batch_buckets(max_batch) if device == "cuda" else None


def warm_batch_sizes(device: str, max_batch: int) -> list[int]:
    """The batch sizes a model's first session runs before /readyz: on CUDA one (each other
    padded size has its own session); on CPU one and the largest (no per-shape planning there,
    only the arena growing to the largest batch)."""
    return [1] if device == "cuda" else sorted({1, max_batch})


def batch_limit_that_pays(
    max_batch: int, one_image_s: float, per_image_in_full_batch_s: float, min_gain: float
) -> int:
    """max_batch when an image in a full batch costs at least min_gain less than one alone (or
    min_gain is 0: batch regardless), else one: a batch that saves nothing only makes its images
    wait for the last of them."""
    if min_gain == 0 or per_image_in_full_batch_s <= (1 - min_gain) * one_image_s:
        return max_batch
    return 1


def _batch_limit(
    max_batch: int,
    min_gain: float,
    session: ort.InferenceSession,
    entry: ModelEntry,
    device: str,
    lane: InferenceLane,
) -> int:
    """The largest batch this model runs (settings.min_batching_gain); measured on CPU only."""
    if device == "cuda" or max_batch == 1 or min_gain == 0:
        return max_batch
    shape = (entry.input.name, entry.input.height, entry.input.width)
    alone, batched = lane.run_and_wait(partial(costs_alone_and_in_batch, session, *shape, max_batch))
    limit = batch_limit_that_pays(max_batch, alone, batched, min_gain)
    log.info(
        "%s: %.1f ms per image alone, %.1f in a batch of %d (fastest of two rounds): batches of up to %d",
        entry.name,
        alone * 1000,
        batched * 1000,
        max_batch,
        limit,
    )
    return limit


# Models whose one-image run on one thread takes longer than this stay off the lane's spare
# workers: on a quiet 2-CPU Xeon VM (2026-12-05) a third worker gave MobileNet (21-27 ms a run)
# about 5 % more throughput at c=32 in paired runs and Xception (150-170 ms) 9-12 % less (README,
# "Performance under contention"). Between the two, the bound is a guess.
SPARE_WORKERS_MAX_RUN_S = 0.05


def batches_at_once(lane: InferenceLane, one_image_s: float) -> int | None:
    """The most batches of a model on the lane at once: None (every worker) for a model whose
    one-image run (timed at warm-up) is short, the workers less the spare ones otherwise."""
    return lane.workers - lane.spare if lane.spare and one_image_s > SPARE_WORKERS_MAX_RUN_S else None


def load_registry(
    settings: Settings,
    manifest: Manifest,
    paths: dict[str, Path],
    providers: list[str],
    threads: int,
    lane: InferenceLane,
    metrics: ServiceMetrics,
    batching: BatchingInForce,
) -> ModelRegistry:
    """Create and warm one session per model (slow: runs while /readyz still says 503).
    batching: the rules in force on this node (runtime.batching_in_force)."""
    models: dict[str, LoadedModel] = {}
    for name, entry in manifest.models.items():
        session = create_session(
            paths[name],
            providers,
            threads,
            settings.intra_op_spinning,
            lane.workers,
            settings.openvino_precision,
        )
        check_tensor_names(session, paths[name], entry.input.name, entry.output.name)
        device = device_of(session)
        sizes = warm_batch_sizes(device, settings.max_batch_size)
        one_image_s = lane.run_and_wait(
            partial(warm, session, entry.input.name, entry.input.height, entry.input.width, sizes)
        )
        max_batch = _batch_limit(settings.max_batch_size, batching.min_gain, session, entry, device, lane)
        padded = padded_batch_sizes(device, settings.max_batch_size)
        by_size = _session_per_padded_size(
            session, padded, paths[name], entry, providers, threads, settings, lane
        )
        histogram = metrics.batch_size.labels(name)
        inference = metrics.inference_seconds.labels(name)

        on_batch = partial(_observe_batch, histogram, inference)
        every_core = _every_core_session(settings, paths[name], entry, providers, threads, lane, one_image_s)

        batcher = Batcher(
            name,
            session,
            input_name=entry.input.name,
            output_name=entry.output.name,
            max_batch=max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            capacity=settings.queue_size,
            lane=lane,
            fallback_seconds=one_image_s,
            max_queue_wait_s=settings.max_queue_wait_ms / 1000,
            max_batch_s=batching.max_batch_s,
            on_batch=on_batch,
            every_core=every_core,
            on_lone_image=partial(_count_lone_image, metrics, name),
            batch_buckets=by_size,
            max_running=batches_at_once(lane, one_image_s),
        )
        # Read at every scrape, on the main port and the extra metrics port alike: never stale.
        metrics.queue_depth.labels(name).set_function(partial(getattr, batcher, "pending"))
        precision = settings.openvino_precision if providers[0] == OPENVINO else "fp32"
        models[name] = LoadedModel(entry, session, batcher, device, precision)
        metrics.model_info.labels(name, entry.version, device, entry.precision).set(1)
        log.info("loaded %s (%s, %s) on %s", name, entry.version, entry.precision, device)
    return ModelRegistry(manifest, models, settings.default_model or manifest.default_model)


def _session_per_padded_size(
    first: ort.InferenceSession,
    padded: list[int] | None,
    path: Path,
    entry: ModelEntry,
    providers: list[str],
    threads: int,
    settings: Settings,
    lane: InferenceLane,
) -> dict[int, ort.InferenceSession] | None:
    """On CUDA one session per padded batch size (`first` is batch one's), each warmed and run at
    its own size only. onnxruntime's CUDA convolutions (cuDNN frontend, onnxruntime >= 1.20)
    build their plans again whenever the input shape changes, and on an H200 each change of
    batch size stalled that batch 0.3-2.6 s although every size had been warmed (README, "GPU";
    onnxruntime issue 23006). None on CPU, where batches are not padded."""
    if padded is None:
        return None
    sessions = {1: first}
    shape = (entry.input.name, entry.input.height, entry.input.width)
    for size in padded[1:]:
        session = create_session(
            path, providers, threads, settings.intra_op_spinning, precision=settings.openvino_precision
        )
        lane.run_and_wait(partial(warm_at, session, *shape, size))
        sessions[size] = session
    return sessions


def _every_core_session(
    settings: Settings,
    path: Path,
    entry: ModelEntry,
    providers: list[str],
    threads: int,
    lane: InferenceLane,
    one_core_s: float,
) -> tuple[ort.InferenceSession, LoneImageLayout] | None:
    """A second session of the model with a thread per CPU (spare workers not counted), for lone
    images on an idle lane (service/batching.py, LoneImageLayout); None when the lane has one
    worker (its session has every core already) or the setting is off. It is warmed at batch 1
    only, the one size it runs: the five models' second sessions raise an idle server's RSS from
    684 to 847 MiB (2026-12-03)."""
    if not settings.lone_image_on_every_core or lane.workers == 1:
        return None
    session = create_session(
        path,
        providers,
        lane.every_core_threads,
        settings.intra_op_spinning,
        precision=settings.openvino_precision,
    )
    every_core_s = lane.run_and_wait(
        partial(warm, session, entry.input.name, entry.input.height, entry.input.width, [1])
    )
    return session, LoneImageLayout(one_core_s, every_core_s)


def _count_lone_image(metrics: ServiceMetrics, model: str, layout: str) -> None:
    metrics.lone_images.labels(model, layout).inc()


def _observe_batch(sizes: Histogram, seconds_per_batch: Histogram, size: int, seconds: float) -> None:
    sizes.observe(size)
    seconds_per_batch.observe(seconds)
