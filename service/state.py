"""What the routes share: the app's state, built by the lifespan, and the dependencies that reach it."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.batching import InferenceLane
from service.classifier import Classifier
from service.errors import ModelNotFound, NotReady, Overloaded
from service.metrics import UNKNOWN_MODEL, ServiceMetrics
from service.registry import ROUTERS, ModelRegistry
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything the routes need, built by the lifespan and reachable from each request."""

    settings: Settings
    metrics: ServiceMetrics
    classifier: Classifier | None = None  # set once the models are loaded and warm
    ready: bool = False
    draining: bool = False
    # Made by the lifespan, which knows the CPU quota and so the layout.
    decode_threads: int = field(init=False)
    decode_pool: ThreadPoolExecutor = field(init=False)
    inference: InferenceLane = field(init=False)

    def model_label(self, name: str | None) -> str:
        """A metric label for a requested model name: known names only, so labels stay few."""
        if name in ROUTERS:
            return name
        registry = self.classifier.registry if self.classifier is not None else None
        if registry is None:
            return UNKNOWN_MODEL
        if name is None:
            return registry.default
        return name if name in registry.models else UNKNOWN_MODEL

    def refusal_before_body(self, name: str | None) -> Overloaded | None:
        """The 503 a request for this model gets before its body is read: when the model's queue
        has no room for even one image. Only a loaded model's name decides it here (auto, the
        cascade and unknown names are no model's, and the routes answer them), and never with the
        response cache on, whose hits are answered without the queue."""
        if self.classifier is None or self.classifier.cache is not None:
            return None
        registry = self.classifier.registry
        model = registry.models.get(name or registry.default)
        return model.batcher.refusal(1) if model is not None else None

    def unknown_model(self, name: str | None) -> ModelNotFound | None:
        """The 404 for a name that is no loaded model nor a router, once the models are loaded
        (before that, the routes answer 503 not_ready)."""
        if self.classifier is None or name is None or name in ROUTERS:
            return None
        try:
            self.classifier.registry.get(name)
        except ModelNotFound as unknown:
            return unknown
        return None

    def begin_draining(self) -> None:
        """SIGTERM: readiness goes false at once so load balancers stop sending new work."""
        self.draining = True
        self.metrics.ready.set(0)


# The dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency
# in its thread pool, a thread hop (and a wait for a free core when the CPU is contended) per
# dependency per request, for a field lookup.


async def get_state(request: Request) -> AppState:
    return _state_of(request)


async def get_registry(request: Request) -> ModelRegistry:
    return _classifier_of(request).registry


async def get_classifier(request: Request) -> Classifier:
    return _classifier_of(request)


def _state_of(request: Request) -> AppState:
    state: AppState = request.app.state.catdog
    return state


def _classifier_of(request: Request) -> Classifier:
    state = _state_of(request)
    if state.classifier is None or not state.ready:
        raise NotReady("models are not loaded yet", headers={"Retry-After": "5"})
    return state.classifier


State = Annotated[AppState, Depends(get_state)]
Registry = Annotated[ModelRegistry, Depends(get_registry)]
Core = Annotated[Classifier, Depends(get_classifier)]
