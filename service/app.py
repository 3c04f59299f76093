"""The HTTP layer: an app factory whose lifespan loads and warms the models, and thin routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.admission import AdmissionMiddleware
from service.batching import InferenceLane
from service.classifier import Answer, Classifier
from service.errors import BadRequest, CatdogError, ClientClosed, ModelUnavailable, NotReady
from service.imaging import DecodeLimits
from service.manifest import Manifest
from service.metrics import UNKNOWN_MODEL, Metrics
from service.middleware import OutcomeMiddleware, RequestIdMiddleware
from service.registry import ModelRegistry, check_models, load_registry
from service.runtime import default_threads, resolve_providers
from service.schemas import (
    CascadeInfo,
    ClassifyResponse,
    ErrorResponse,
    Health,
    ImageResult,
    ModelInfo,
    ModelList,
    Selection,
    TimingsMs,
    TopEntry,
)
from service.settings import Settings
from service.uploads import BodyLimitMiddleware, read_images

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed request (bad multipart body, bad header).",
        404: "Unknown model name; the message lists valid names.",
        413: "Body larger than the cap, or image with too many pixels.",
        415: "Not an accepted image type, or a corrupt/truncated image.",
        422: "Invalid query parameter.",
        503: "Not ready, shutting down, or the model's queue is full (see Retry-After).",
        504: "The request's deadline cannot be met.",
    }.items()
}


@dataclass
class AppState:
    """Everything the routes need, built by the lifespan and reachable from each request."""

    settings: Settings
    metrics: Metrics
    classifier: Classifier | None = None  # set once the models are loaded and warm
    ready: bool = False
    draining: bool = False
    decode_pool: ThreadPoolExecutor = field(init=False)
    inference: InferenceLane = field(init=False)

    def __post_init__(self) -> None:
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self.inference = InferenceLane()

    def model_label(self, name: str | None) -> str:
        """A metric label for a requested model name: known names only, so labels stay few."""
        if name in ("auto", "cascade"):
            return name
        registry = self.classifier.registry if self.classifier is not None else None
        if registry is None:
            return UNKNOWN_MODEL
        if name is None:
            return registry.default
        return name if name in registry.models else UNKNOWN_MODEL

    def begin_draining(self) -> None:
        """SIGTERM: readiness goes false at once so load balancers stop sending new work."""
        self.draining = True
        self.metrics.ready.set(0)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.catdog
    return state


def get_registry(request: Request) -> ModelRegistry:
    return get_classifier(request).registry


def get_classifier(request: Request) -> Classifier:
    state = get_state(request)
    if state.classifier is None or not state.ready:
        raise NotReady("models are not loaded yet", headers={"Retry-After": "5"})
    return state.classifier


State = Annotated[AppState, Depends(get_state)]
Registry = Annotated[ModelRegistry, Depends(get_registry)]
Core = Annotated[Classifier, Depends(get_classifier)]


async def _load(state: AppState, manifest: Manifest, paths: dict[str, Path], providers: list[str],
                threads: int, on_fatal: Callable[[], None]) -> None:
    """Create and warm the sessions off the event loop; only then does /readyz answer 200."""
    try:
        registry = await asyncio.to_thread(load_registry, state.settings, manifest, paths, providers, threads,
                                           state.inference, state.metrics)
    except Exception:
        log.critical("loading the models failed; the process cannot serve", exc_info=True)
        on_fatal()
        return
    registry.start()
    limits = DecodeLimits(state.settings.max_pixels, state.settings.max_decode_bytes)
    state.classifier = Classifier(registry, state.decode_pool, state.metrics, limits,
                                  state.settings.decode_threads)
    state.ready = not state.draining
    state.metrics.ready.set(1 if state.ready else 0)
    log.info("ready: %s", ", ".join(registry.names()))


def _exit_process() -> None:
    os._exit(3)  # same code uvicorn uses for a failed start-up


def create_app(settings: Settings | None = None, on_fatal: Callable[[], None] = _exit_process,
               metrics_host: str = "127.0.0.1") -> FastAPI:
    """The app; on_fatal runs if the models fail to load after start-up checks passed.

    metrics_host: the address the extra metrics port (CATDOG_METRICS_PORT) binds, the main
    server's --host, so that port is never more exposed than the service itself.
    """
    settings = settings or Settings()
    state = AppState(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything a wrong setting can break is checked here, so the process fails to start.
        providers = resolve_providers(settings.providers)
        threads = settings.intra_op_threads or default_threads()
        manifest, paths = check_models(settings)
        log.info("providers %s, %d intra-op threads, %d models", providers, threads, len(paths))
        if settings.metrics_port:
            start_http_server(settings.metrics_port, addr=metrics_host, registry=state.metrics.registry)
        loading = asyncio.create_task(_load(state, manifest, paths, providers, threads, on_fatal))
        try:
            yield
        finally:
            state.begin_draining()
            await loading
            if state.classifier is not None:
                await state.classifier.registry.close()
            state.decode_pool.shutdown(wait=True)
            state.inference.shutdown()
            log.info("drained and stopped")

    app = FastAPI(title="catdog-serve", version="0.1.0", lifespan=lifespan,
                  description="Cat or dog? Fine-tuned Xception and MobileNet on onnxruntime.")
    app.state.catdog = state
    # Added innermost first. Requests pass: ids -> counting -> admission -> body limits -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       idle_timeout_s=settings.body_timeout_s, min_bytes_per_s=settings.min_upload_bytes_per_s)
    app.add_middleware(AdmissionMiddleware, max_in_progress=settings.max_concurrent_requests)
    app.add_middleware(OutcomeMiddleware, requests=state.metrics.requests, label_of=state.model_label)
    app.add_middleware(RequestIdMiddleware, in_flight=state.metrics.in_flight)  # outermost: ids on 413s too
    _install_error_handlers(app)
    _install_routes(app, settings.max_files)
    return app


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    # Each handler records its code in request.state.outcome: OutcomeMiddleware counts it.
    @app.exception_handler(CatdogError)
    async def catdog_error(request: Request, exc: CatdogError) -> JSONResponse:
        request.state.outcome = exc.code
        if isinstance(exc, ClientClosed):
            log.debug("client closed the connection: %s", exc.message)
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.outcome = "invalid_parameter"
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        request.state.outcome = code
        return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request.state.outcome = "internal_error"
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "internal server error; see the server log")


def _deadline(request: Request, timeout_ms: float | None, start: float) -> float | None:
    header = request.headers.get("X-Deadline-Ms")
    budget = timeout_ms
    if header is not None:
        try:
            budget = float(header)
        except ValueError as exc:
            raise BadRequest("X-Deadline-Ms must be a number of milliseconds") from exc
        if not 0 < budget <= 3_600_000:
            raise BadRequest("X-Deadline-Ms must be in (0, 3600000]")
    return start + budget / 1000 if budget is not None else None


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run the work while watching the connection: a client that leaves cancels its queued jobs
    (they are dropped before they run) and the request ends as 499 client_closed."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, CatdogError):
        await task
    raise ClientClosed("the client closed the connection before the answer was ready")


async def _disconnected(request: Request) -> None:
    # Once the body has been read, the server's receive() returns only when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _shape(answer: Answer, device: str, version: str | None, request_id: str, top: int | None,
           total_ms: float) -> ClassifyResponse:
    results = []
    for a in answer.answers:
        p = a.prediction
        ranked = sorted(p.probabilities.items(), key=lambda kv: kv[1], reverse=True)
        results.append(ImageResult(
            label=p.label, model=a.model, confidence=p.confidence, probabilities=p.probabilities,
            top=[TopEntry(label=k, probability=v) for k, v in ranked[:top]] if top else None,
            confidences=a.confidences, escalated=a.escalated, degraded=a.degraded,
        ))
    t = answer.timings
    return ClassifyResponse(
        request_id=request_id, mode=answer.mode, model=answer.name, version=version, device=device,
        models_run=answer.models_run, selection=Selection(**answer.selection) if answer.selection else None,
        results=results, batch_sizes=answer.batch_sizes,
        timings_ms=TimingsMs(decode=t.decode_ms, queue=t.queue_ms, inference=t.inference_ms, total=total_ms),
    )


def _install_routes(app: FastAPI, max_files: int) -> None:
    classify_body = {
        "requestBody": {
            "required": True,
            "description": "One image as the raw body, or one or more `file` fields as multipart/form-data.",
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "array", "minItems": 1, "maxItems": max_files,
                             "items": {"type": "string", "format": "binary"}}}}},
                **{media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_MEDIA_TYPES},
            },
        }
    }

    @app.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=classify_body,
              summary="Classify one or more images as cat or dog")
    async def classify(
        request: Request,
        state: State,
        classifier: Core,
        model: Annotated[str | None, Query(max_length=64, description=(
            "A model name from /models, `auto` (the server picks by max_latency_ms / min_accuracy) or "
            "`cascade` (small model first, large one when unsure). Default from settings."))] = None,
        top: Annotated[int | None, Query(ge=1, le=16, description="Also return the N most probable labels.")] = None,
        timeout_ms: Annotated[float | None, Query(gt=0, le=3_600_000, description="Deadline in ms (504 if missed).")] = None,
        max_latency_ms: Annotated[float | None, Query(gt=0, le=3_600_000, description="auto: latency budget.")] = None,
        min_accuracy: Annotated[float | None, Query(ge=0, le=1, description="auto: accuracy floor, compared with each model's lowest per-source test accuracy.")] = None,
        cascade: Annotated[str | None, Query(max_length=130, description="cascade: `small,large` model names.")] = None,
        min_confidence: Annotated[float | None, Query(ge=0, le=1, description="cascade: escalation threshold.")] = None,
    ) -> ClassifyResponse:
        start = time.monotonic()
        deadline = _deadline(request, timeout_ms, start)
        mode = model if model in ("auto", "cascade") else None
        label = mode or classifier.registry.get(model).entry.name
        request.state.model_label = label
        blobs = await read_images(request, state.settings.max_files)
        if mode == "auto":
            work = classifier.auto(blobs, deadline, max_latency_ms, min_accuracy)
        elif mode == "cascade":
            work = classifier.cascade(blobs, deadline, cascade, min_confidence)
        else:
            work = classifier.direct(label, blobs, deadline)
        answer = await unless_client_leaves(request, work)
        total_ms = (time.monotonic() - start) * 1000
        state.metrics.request_seconds.labels(label).observe(total_ms / 1000)
        primary = classifier.registry.get(answer.models_run[0])
        version = primary.entry.version if answer.mode != "cascade" else None
        return _shape(answer, primary.device, version, request.state.request_id, top, total_ms)

    @app.get("/models", response_model=ModelList, responses={503: ERRORS[503]})
    async def list_models(registry: Registry) -> ModelList:
        cascades = [CascadeInfo(small=c.small, large=c.large, threshold=c.threshold,
                                test_accuracy=c.test.accuracy if c.test else None,
                                test_escalation_rate=c.test_escalation_rate, test_cost_ratio=c.test_cost_ratio,
                                test_accuracy_by_source={s: f.accuracy for s, f in c.test_by_source.items()},
                                test_escalation_rate_by_source={s: f.escalation_rate
                                                                for s, f in c.test_by_source.items()})
                    for c in registry.manifest.cascades]
        return ModelList(default=registry.default, models=[_info(registry, n) for n in registry.names()],
                         cascades=cascades)

    @app.get("/models/{name}", response_model=ModelInfo, responses={404: ERRORS[404], 503: ERRORS[503]})
    async def get_model(name: str, registry: Registry) -> ModelInfo:
        return _info(registry, registry.get(name).entry.name)

    @app.get("/livez", response_model=Health, responses={503: ERRORS[503]})
    @app.get("/v2/health/live", response_model=Health, responses={503: ERRORS[503]}, include_in_schema=False)
    async def livez(state: State) -> Health:
        _check_batchers(state)  # a crashed batcher never recovers in-process: let Kubernetes restart us
        return Health(status="alive")

    @app.get("/readyz", response_model=Health, responses={503: ERRORS[503]})
    @app.get("/v2/health/ready", response_model=Health, responses={503: ERRORS[503]}, include_in_schema=False)
    async def readyz(state: State) -> Health:
        if state.draining:
            raise NotReady("shutting down")
        if not state.ready:
            raise NotReady("models are still loading")
        _check_batchers(state)
        return Health(status="ready")

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics(state: State) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> HTMLResponse:
        return HTMLResponse(files("service").joinpath("static/index.html").read_text(encoding="utf-8"))


def _check_batchers(state: AppState) -> None:
    crashed = state.classifier.registry.crashed() if state.classifier is not None else []
    if crashed:
        raise ModelUnavailable(f"the batcher of {', '.join(crashed)} crashed (see the log); restart the process")


def _info(registry: ModelRegistry, name: str) -> ModelInfo:
    loaded = registry.models[name]
    entry, live = loaded.entry, loaded.batcher.stats.batch_seconds.get(1)
    test = entry.test
    hardest = test.hardest_source if test else (None, None)
    return ModelInfo(
        name=name, version=entry.version, family=entry.family, precision=entry.precision, device=loaded.device,
        labels=entry.labels, input_width=entry.input.width, input_height=entry.input.height,
        test_accuracy=test.accuracy if test else None,
        test_log_loss=test.log_loss if test else None, test_ece=test.ece if test else None,
        test_accuracy_by_source={s: m.accuracy for s, m in test.by_source.items()} if test else {},
        selection_accuracy=hardest[1], selection_accuracy_source=hardest[0], derived_from=entry.derived_from,
        build_latency_p50_ms_batch1=entry.latency.p50_ms_batch1,
        live_latency_p50_ms=live.value * 1000 if live and live.value is not None else None,
        queue_depth=loaded.batcher.pending,
    )
