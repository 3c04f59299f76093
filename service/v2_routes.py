"""The Open Inference Protocol v2 routes (server and model metadata, readiness, inference), so
Triton's and KServe's clients can call this server. The same core, admission control, deadlines,
body limits and metrics as /classify; errors in the protocol's `{"error": "..."}` shape."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.classifier import Answer, Classifier
from service.errors import BadRequest, ModelNotFound, NotReady, UnsupportedMediaType
from service.http_errors import documented_errors
from service.inference_protocol import (
    EXTENSIONS,
    HEADER_LENGTH,
    InferenceRequest,
    ModelMetadata,
    ModelReady,
    Outputs,
    Parameters,
    ParsedRequest,
    ProtocolError,
    ServerMetadata,
    encode_response,
    model_metadata,
    parse_request,
)
from service.registry import ROUTERS, ModelRegistry
from service.request_control import deadline_from, read_body, unless_client_leaves
from service.state import Core, Registry, State

SERVER_NAME = "catdog-serve"

V2_ERRORS = documented_errors(
    ProtocolError,
    {
        400: "Malformed request: JSON, datatype, shape, base64, binary lengths, parameters.",
        404: "Unknown model, or a version the model does not have.",
        408: "The upload stalled or was too slow; the connection is closed.",
        413: "Body larger than the cap, or an image with too many pixels or too costly to decode.",
        415: "An element is not an accepted image, or is corrupt, or has malformed EXIF.",
        422: "auto: constraints no model meets.",
        503: "Overloaded (see Retry-After), not ready, shutting down, or the model's batcher crashed.",
        504: "The request's deadline (`timeout` parameter or X-Deadline-Ms) cannot be met.",
    },
)


def version_of(registry: ModelRegistry, name: str) -> str:
    """A model's version is its manifest version (a file hash); auto's and cascade's are a hash of
    the versions of the models they choose from, so any rebuild changes them too."""
    if name == "auto":
        return _combined([m.entry.version for m in registry.models.values()])
    if name == "cascade":
        pair = _cascade_pair(registry)
        return _combined([registry.get(n).entry.version for n in pair])
    return registry.get(name).entry.version


def _cascade_pair(registry: ModelRegistry) -> tuple[str, str]:
    if not registry.manifest.cascades:
        raise ModelNotFound("the manifest defines no cascade")
    first = registry.manifest.cascades[0]
    return first.small, first.large


def _combined(versions: list[str]) -> str:
    return hashlib.sha256(",".join(versions).encode()).hexdigest()[:12]


def _resolve(registry: ModelRegistry, name: str, version: str | None) -> str:
    """The model's version; 404 for an unknown name, or a version other than the loaded one."""
    current = version_of(registry, name)
    if version is not None and version != current:
        raise ModelNotFound(f"model {name} has version {current} loaded, not {version}")
    return current


def _metadata(registry: ModelRegistry, name: str, version: str | None) -> ModelMetadata:
    current = _resolve(registry, name, version)
    platform = "ensemble" if name in ROUTERS else "onnxruntime_onnx"
    labels = registry.get(None).entry.labels if name in ROUTERS else registry.get(name).entry.labels
    return model_metadata(name, [current], platform, len(labels))


def _ready(registry: ModelRegistry, name: str, version: str | None) -> ModelReady:
    _resolve(registry, name, version)
    members = (
        list(registry.models) if name == "auto" else _cascade_pair(registry) if name in ROUTERS else [name]
    )
    crashed = [m for m in members if m in registry.crashed()]
    if crashed:
        raise NotReady(f"the batcher of {', '.join(crashed)} crashed; restart the process")
    return ModelReady(name=name, ready=True)


async def _infer(
    request: Request, state: State, classifier: Classifier, name: str, version: str | None
) -> Response:
    start = time.monotonic()
    current = _resolve(classifier.registry, name, version)
    request.state.model_label = name
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Decompressing would let a small body become a large one past the body cap.
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:32]} is not accepted; send the body uncompressed"
        )
    body = await read_body(request)
    parsed = parse_request(body, request.headers.get(HEADER_LENGTH), state.settings.max_files)
    options = parsed.options
    timeout_ms = options.timeout / 1000 if options.timeout is not None else None
    deadline = deadline_from(request, timeout_ms, start)
    work = _work(classifier, name, parsed, deadline)
    answer = await unless_client_leaves(request, work)
    state.metrics.request_seconds.labels(name).observe(time.monotonic() - start)
    return _response(classifier, name, current, parsed, answer, request.state.request_id)


def _work(
    classifier: Classifier, name: str, parsed: ParsedRequest, deadline: float | None
) -> Coroutine[Any, Any, Answer]:
    """The core's call for this model name, with the request parameters that apply to it."""
    options = parsed.options
    if name == "auto":
        return classifier.auto(parsed.images, deadline, options.max_latency_ms, options.min_accuracy)
    if name == "cascade":
        return classifier.cascade(parsed.images, deadline, options.cascade, options.min_confidence)
    routing = (options.cascade, options.min_confidence, options.max_latency_ms, options.min_accuracy)
    if any(value is not None for value in routing):
        raise BadRequest("cascade, min_confidence, max_latency_ms and min_accuracy apply to auto and cascade")
    return classifier.direct(name, parsed.images, deadline)


def _response(
    classifier: Classifier, name: str, version: str, parsed: ParsedRequest, answer: Answer, request_id: str
) -> Response:
    label_names = classifier.registry.get(answer.models_run[0]).entry.labels
    outputs = Outputs(
        probabilities=np.array(
            [[a.prediction.probabilities[label] for label in label_names] for a in answer.answers],
            dtype=np.float32,
        ),
        labels=[a.prediction.label for a in answer.answers],
        label_names=label_names,
    )
    parameters: Parameters = {
        "request_id": request_id,
        "mode": answer.mode,
        "answered_by": ",".join(a.model for a in answer.answers),
        "models_run": ",".join(answer.models_run),
        "escalated": sum(a.escalated for a in answer.answers),
        "degraded": any(a.degraded for a in answer.answers),
        "cached": sum(a.cached for a in answer.answers),
    }
    if answer.selection.get("reason"):
        parameters["selection_reason"] = str(answer.selection["reason"])
    body, json_size = encode_response(
        name, version, parsed.id, parameters, outputs, parsed.outputs, parsed.options.binary_data_output
    )
    if json_size is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_size)})


def _infer_openapi(components: dict[str, Any]) -> dict[str, Any]:
    """The request body as OpenAPI sees it: the JSON form, or JSON plus binary tensor data."""
    schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components["InferenceRequest"] = schema
    return {
        "requestBody": {
            "required": True,
            "description": (
                "An inference request: JSON with the images as base64 BYTES elements; or JSON followed "
                f"by binary tensor data ({HEADER_LENGTH} = the JSON's size); or, with {HEADER_LENGTH}: "
                "0, one encoded image as the whole body."
            ),
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Outputs `probabilities` (FP32 [N, labels]) and `label` (BYTES [N]); binary data "
        f"after the JSON when asked for ({HEADER_LENGTH} gives the JSON's size).",
        "content": {"application/json": {}, "application/octet-stream": {}},
    },
    **V2_ERRORS,
}


def install_v2_routes(app: FastAPI) -> None:
    components: dict[str, Any] = {}
    infer_openapi = _infer_openapi(components)
    tags: list[str | Enum] = ["inference protocol v2"]
    model, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"

    @app.get("/v2", response_model=ServerMetadata, tags=tags)
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=app.version, extensions=EXTENSIONS)

    @app.get(model, response_model=ModelMetadata, responses=V2_ERRORS, tags=tags)
    async def metadata(registry: Registry, name: str) -> ModelMetadata:
        return _metadata(registry, name, None)

    @app.get(versioned, response_model=ModelMetadata, responses=V2_ERRORS, tags=tags)
    async def version_metadata(registry: Registry, name: str, version: str) -> ModelMetadata:
        return _metadata(registry, name, version)

    @app.get(model + "/ready", response_model=ModelReady, responses=V2_ERRORS, tags=tags)
    async def ready(registry: Registry, name: str) -> ModelReady:
        return _ready(registry, name, None)

    @app.get(versioned + "/ready", response_model=ModelReady, responses=V2_ERRORS, tags=tags)
    async def version_ready(registry: Registry, name: str, version: str) -> ModelReady:
        return _ready(registry, name, version)

    infer_route: dict[str, Any] = {
        "response_class": Response,
        "responses": _INFER_RESPONSES,
        "openapi_extra": infer_openapi,
        "tags": tags,
        "summary": "Classify images sent as an Open Inference Protocol v2 BYTES tensor",
    }

    @app.post(model + "/infer", **infer_route)
    async def infer(request: Request, state: State, classifier: Core, name: str) -> Response:
        return await _infer(request, state, classifier, name, None)

    @app.post(versioned + "/infer", **infer_route)
    async def version_infer(
        request: Request, state: State, classifier: Core, name: str, version: str
    ) -> Response:
        return await _infer(request, state, classifier, name, version)

    _add_components(app, components)


def _add_components(app: FastAPI, components: dict[str, Any]) -> None:
    """Put the request schema's definitions where its $refs point, in the OpenAPI components."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            build().setdefault("components", {}).setdefault("schemas", {}).update(components)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]
