"""Per-request plumbing as plain ASGI: request ids, the in-flight gauge and outcome counting.

Plain ASGI rather than Starlette's BaseHTTPMiddleware (`@app.middleware("http")`), which runs
the rest of the app in a separate task and wraps the response body in a stream: about a
millisecond per request on this kind of machine, more than the whole of this middleware's work.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import is_classification

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
_MAX_ID_LENGTH = 128
_PROTOCOL_MODELS = "/v2/models/"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID if short and printable (it is echoed in a header), else a new one."""
    for key, value in headers:
        if key == _HEADER_KEY:
            incoming = value.decode("latin-1")
            if 0 < len(incoming) <= _MAX_ID_LENGTH and incoming.isprintable():
                return incoming
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every HTTP request an id (request.state.request_id and the response header)."""

    def __init__(self, app: ASGIApp, in_flight: Gauge) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = rid
        header = (_HEADER_KEY, rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight.dec()


class OutcomeMiddleware:
    """Counts every classification response once, by the status it really had.

    The one place outcomes are counted: rejections by middleware (413, 408, 503 before the body),
    validation errors, errors from the core, clients that left (499) and unexpected failures
    alike. The error code comes from scope["state"]["outcome"], set by whoever answered; the model
    label from the route, or else from the query mapped onto the known names (a small fixed set).
    """

    def __init__(self, app: ASGIApp, requests: Counter, label_of: Callable[[str | None], str]) -> None:
        self.app = app
        self.requests = requests
        self.label_of = label_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_classification(scope["path"]):
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state = scope.setdefault("state", {})
        try:
            await self.app(scope, receive, capture)
        except Exception:
            state["outcome"] = "internal_error"
            raise
        finally:
            model = state.get("model_label") or self.label_of(requested_model(scope))
            outcome = state.get("outcome") or ("ok" if status < 400 else "internal_error")
            self.requests.labels(model, outcome, f"{status // 100}xx").inc()


def requested_model(scope: Scope) -> str | None:
    """The model a request names before any route has run: in the path on the protocol's routes
    (/v2/models/{name}/...), in the query on /classify."""
    path: str = scope["path"]
    if path.startswith(_PROTOCOL_MODELS):
        return path.removeprefix(_PROTOCOL_MODELS).split("/", 1)[0]
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model")
    return values[0] if values else None
