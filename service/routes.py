"""The HTTP routes: parse the request, call the core, shape the answer."""

from __future__ import annotations

import logging
import time
from importlib.resources import files
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from catdog_core.media import RAW_BODY_MEDIA_TYPES
from service.classifier import Answer
from service.errors import ModelUnavailable, NotReady
from service.http_errors import ERRORS
from service.registry import ROUTERS, ModelRegistry
from service.request_control import deadline_from, unless_client_leaves
from service.schemas import (
    CascadeInfo,
    ClassifyResponse,
    Health,
    ImageResult,
    ModelInfo,
    ModelList,
    Selection,
    TimingsMs,
    TopEntry,
)
from service.state import AppState, Core, Registry, State
from service.uploads import read_images

log = logging.getLogger(__name__)


def _shape(
    answer: Answer, device: str, version: str | None, request_id: str, top: int | None, total_ms: float
) -> ClassifyResponse:
    results = []
    for a in answer.answers:
        p = a.prediction
        ranked = sorted(p.probabilities.items(), key=lambda kv: kv[1], reverse=True)
        results.append(
            ImageResult(
                label=p.label,
                model=a.model,
                confidence=p.confidence,
                probabilities=p.probabilities,
                top=[TopEntry(label=k, probability=v) for k, v in ranked[:top]] if top else None,
                confidences=a.confidences,
                escalated=a.escalated,
                degraded=a.degraded,
                cached=a.cached,
            )
        )
    t = answer.timings
    return ClassifyResponse(
        request_id=request_id,
        mode=answer.mode,
        model=answer.name,
        version=version,
        device=device,
        models_run=answer.models_run,
        selection=Selection(**answer.selection) if answer.selection else None,
        results=results,
        batch_sizes=answer.batch_sizes,
        timings_ms=TimingsMs(decode=t.decode_ms, queue=t.queue_ms, inference=t.inference_ms, total=total_ms),
    )


def install_routes(app: FastAPI, max_files: int) -> None:
    classify_body = {
        "requestBody": {
            "required": True,
            "description": "One image as the raw body, or one or more `file` fields as multipart/form-data.",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": max_files,
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
                **{
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in RAW_BODY_MEDIA_TYPES
                },
            },
        }
    }

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra=classify_body,
        summary="Classify one or more images as cat or dog",
    )
    async def classify(
        request: Request,
        state: State,
        classifier: Core,
        model: Annotated[
            str | None,
            Query(
                max_length=64,
                description=(
                    "A model name from /models, `auto` (the server picks by max_latency_ms / min_accuracy) "
                    "or "
                    "`cascade` (small model first, large one when unsure). Default from settings."
                ),
            ),
        ] = None,
        top: Annotated[
            int | None, Query(ge=1, le=16, description="Also return the N most probable labels.")
        ] = None,
        timeout_ms: Annotated[
            float | None, Query(gt=0, le=3_600_000, description="Deadline in ms (504 if missed).")
        ] = None,
        max_latency_ms: Annotated[
            float | None, Query(gt=0, le=3_600_000, description="auto: latency budget.")
        ] = None,
        min_accuracy: Annotated[
            float | None,
            Query(
                ge=0,
                le=1,
                description=(
                    "auto: accuracy floor, compared with each model's lowest per-source test accuracy."
                ),
            ),
        ] = None,
        cascade: Annotated[
            str | None, Query(max_length=130, description="cascade: `small,large` model names.")
        ] = None,
        min_confidence: Annotated[
            float | None, Query(ge=0, le=1, description="cascade: escalation threshold.")
        ] = None,
    ) -> ClassifyResponse:
        start = time.monotonic()
        deadline = deadline_from(request, timeout_ms, start)
        mode = model if model in ROUTERS else None
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
        cascades = [
            CascadeInfo(
                small=c.small,
                large=c.large,
                threshold=c.threshold,
                compute_budget=c.compute_budget,
                rule_threshold=c.rule_threshold,
                test_accuracy=c.test.accuracy if c.test else None,
                test_escalation_rate=c.test_escalation_rate,
                test_cost_ratio=c.test_cost_ratio,
                test_accuracy_by_source={s: f.accuracy for s, f in c.test_by_source.items()},
                test_escalation_rate_by_source={s: f.escalation_rate for s, f in c.test_by_source.items()},
            )
            for c in registry.manifest.cascades
        ]
        return ModelList(
            default=registry.default, models=[_info(registry, n) for n in registry.names()], cascades=cascades
        )

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
        raise ModelUnavailable(
            f"the batcher of {', '.join(crashed)} crashed (see the log); restart the process"
        )


def _info(registry: ModelRegistry, name: str) -> ModelInfo:
    loaded = registry.models[name]
    entry, live = loaded.entry, loaded.batcher.stats.batch_seconds.get(1)
    test = entry.test
    hardest = test.hardest_source if test else (None, None)
    return ModelInfo(
        name=name,
        version=entry.version,
        family=entry.family,
        precision=entry.precision,
        device=loaded.device,
        provider=loaded.provider,
        compute_precision=loaded.compute_precision,
        labels=entry.labels,
        input_width=entry.input.width,
        input_height=entry.input.height,
        test_accuracy=test.accuracy if test else None,
        test_log_loss=test.log_loss if test else None,
        test_ece=test.ece if test else None,
        test_accuracy_by_source={s: m.accuracy for s, m in test.by_source.items()} if test else {},
        selection_accuracy=hardest[1],
        selection_accuracy_source=hardest[0],
        derived_from=entry.derived_from,
        build_latency_p50_ms_batch1=entry.latency.p50_ms_batch1,
        live_latency_p50_ms=live.value * 1000 if live and live.value is not None else None,
        queue_depth=loaded.batcher.pending,
        max_batch=loaded.batcher.max_batch,
    )
