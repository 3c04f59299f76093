"""The app factory: settings in, an app whose lifespan loads and warms the models out."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import onnxruntime as ort
from fastapi import FastAPI
from prometheus_client import start_http_server

from catdog_core.sessions import OPENVINO
from service.admission import AdmissionMiddleware
from service.batching import InferenceLane
from service.cache import ResponseCache
from service.classifier import Classifier
from service.http_errors import install_error_handlers
from service.imaging import DecodeLimits
from service.manifest import Manifest
from service.metrics import ServiceMetrics
from service.middleware import OutcomeMiddleware, RequestIdMiddleware, requested_model
from service.registry import ModelRegistry, check_models, load_registry
from service.routes import install_routes
from service.runtime import (
    BatchingInForce,
    balance_batches,
    batching_in_force,
    cgroup_cpu_quota,
    check_precision,
    decode_threads,
    default_threads,
    inference_layout,
    resolve_providers,
)
from service.settings import Settings
from service.shadow import ShadowWatch, default_large_model, shadow_session
from service.state import AppState
from service.uploads import BodyLimitMiddleware
from service.v2_routes import install_v2_routes

log = logging.getLogger(__name__)


async def _load(
    state: AppState,
    manifest: Manifest,
    paths: dict[str, Path],
    providers: list[str],
    threads: int,
    batching: BatchingInForce,
    on_fatal: Callable[[], None],
) -> None:
    """Create and warm the sessions off the event loop; only then does /readyz answer 200."""
    try:
        registry = await asyncio.to_thread(
            load_registry,
            state.settings,
            manifest,
            paths,
            providers,
            threads,
            state.inference,
            state.metrics,
            batching,
        )
        checker: tuple[str, ort.InferenceSession] | None = None
        if state.settings.shadow_rate > 0:
            large = state.settings.shadow_model or default_large_model(registry)
            session = await asyncio.to_thread(
                shadow_session,
                paths[large],
                providers,
                manifest.models[large],
                state.settings.openvino_precision,
            )
            checker = (large, session)
        classifier = _classifier(state, registry, checker)
    except Exception:
        log.critical("loading the models failed; the process cannot serve", exc_info=True)
        on_fatal()
        return
    registry.start()
    state.classifier = classifier
    state.ready = not state.draining
    state.metrics.ready.set(1 if state.ready else 0)
    log.info("ready: %s", ", ".join(registry.names()))


def _classifier(
    state: AppState, registry: ModelRegistry, checker: tuple[str, ort.InferenceSession] | None
) -> Classifier:
    """The core over the loaded models, with the response cache and the shadow watch if set."""
    settings = state.settings
    limits = DecodeLimits(settings.max_pixels, settings.max_decode_bytes, settings.max_jpeg_scans)
    cache = (
        ResponseCache(settings.cache_max_entries, settings.cache_max_bytes, state.metrics.cache)
        if settings.cache_max_entries
        else None
    )
    classifier = Classifier(registry, state.decode_pool, state.metrics, limits, state.decode_threads, cache)
    if checker is not None:
        large, session = checker
        classifier.shadow = ShadowWatch(
            registry,
            large,
            session,
            settings.shadow_rate,
            limits,
            state.metrics.shadow,
            lambda: state.inference.idle,
        )
        log.info(
            "shadow: %s checks %g %% of the other models' answers, when idle",
            large,
            100 * settings.shadow_rate,
        )
    return classifier


def _exit_process() -> None:
    os._exit(3)  # same code uvicorn uses for a failed start-up


def create_app(
    settings: Settings | None = None,
    on_fatal: Callable[[], None] = _exit_process,
    metrics_host: str = "127.0.0.1",
) -> FastAPI:
    """The app; on_fatal runs if the models fail to load after start-up checks passed.

    metrics_host: the address the extra metrics port (CATDOG_METRICS_PORT) binds, the main
    server's --host, so that port is never more exposed than the service itself.
    """
    settings = settings or Settings()
    state = AppState(settings, ServiceMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything a wrong setting can break is checked here, so the process fails to start.
        providers = resolve_providers(settings.providers)
        check_precision(settings.openvino_precision, providers)
        quota = cgroup_cpu_quota()  # read once: the thread layout and the batching rules follow it
        workers, threads, spare = inference_layout(
            settings.inference_workers,
            settings.intra_op_threads,
            providers,
            quota,
            settings.spare_inference_workers,
        )
        manifest, paths = check_models(settings)
        balanced = balance_batches(settings.balance_batches, workers, quota.cpus if quota else None)
        batching = batching_in_force(settings.min_batching_gain, settings.max_batch_ms, quota)
        state.inference = InferenceLane(
            workers, balanced, every_core_threads=default_threads(quota), spare=spare
        )
        state.decode_threads = decode_threads(settings.decode_threads, quota)
        state.decode_pool = ThreadPoolExecutor(state.decode_threads, thread_name_prefix="decode")
        log.info(
            "providers %s%s, %d inference workers of %d intra-op threads (spinning %s, queues %s), "
            "%d decode threads, %d models",
            providers,
            f" (OpenVINO in {settings.openvino_precision})" if OPENVINO in providers else "",
            workers,
            threads,
            settings.intra_op_spinning,
            "shared between workers" if balanced else "taken whole",
            state.decode_threads,
            len(paths),
        )
        if settings.metrics_port:
            start_http_server(settings.metrics_port, addr=metrics_host, registry=state.metrics.registry)
        loading = asyncio.create_task(_load(state, manifest, paths, providers, threads, batching, on_fatal))
        try:
            yield
        finally:
            state.begin_draining()
            await loading
            if state.classifier is not None:
                if state.classifier.shadow is not None:
                    await state.classifier.shadow.close()
                await state.classifier.registry.close()
            state.decode_pool.shutdown(wait=True)
            state.inference.shutdown()
            log.info(
                "drained and stopped; classification responses: %s",
                json.dumps(state.metrics.responses_by_outcome(), sort_keys=True),
            )

    app = FastAPI(
        title="catdog-serve",
        version="0.1.0",
        lifespan=lifespan,
        description="Cat or dog? Fine-tuned Xception and MobileNet on onnxruntime.",
    )
    app.state.catdog = state
    # Added innermost first. Requests pass: ids -> counting -> body limits -> admission -> routes.
    # Body limits before admission: a body declared over the limit gets its 413 even when the
    # server is refusing work, since a 503 would have the client retry what can never be taken.
    app.add_middleware(
        AdmissionMiddleware,
        max_in_progress=settings.max_concurrent_requests,
        refusal_for=lambda scope: state.refusal_before_body(requested_model(scope)),
        not_found_for=lambda scope: state.unknown_model(requested_model(scope)),
        draining=lambda: state.draining,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        idle_timeout_s=settings.body_timeout_s,
        min_bytes_per_s=settings.min_upload_bytes_per_s,
    )
    app.add_middleware(OutcomeMiddleware, requests=state.metrics.requests, label_of=state.model_label)
    app.add_middleware(RequestIdMiddleware, in_flight=state.metrics.in_flight)  # outermost: ids on 413s too
    install_error_handlers(app)
    install_routes(app, settings.max_files)
    install_v2_routes(app)
    return app
