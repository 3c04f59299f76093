"""Per-request plumbing as plain ASGI: request ids and the in-flight gauge.

Plain ASGI rather than Starlette's BaseHTTPMiddleware (`@app.middleware("http")`), which runs
the rest of the app in a separate task and wraps the response body in a stream: about a
millisecond per request on this kind of machine, more than the whole of this middleware's work.
"""

from __future__ import annotations

import uuid

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
_MAX_ID_LENGTH = 128


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
