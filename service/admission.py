"""Admission before work: a cap on classification requests in progress, decided before any of the
body is read, so excess load is shed with a fast 503 instead of queueing invisibly in the event
loop and the decode pool (an open-loop 2x overload used to be answered 200 after 25 s p50).

A request that names a model whose queue has no room for even one image (full, or past the
queue-wait cap) is refused here too, before its body is read: refused after the upload, it cost
the CPU of reading (and parsing) it, and under a CPU quota a client pool that retried at once took
that CPU from the admitted work (Xception under a 1.5-CPU quota answered 1.8 instead of 2.9 req/s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import CatdogError, ModelNotFound, Overloaded, ShuttingDown
from service.uploads import reject


def is_classification(path: str) -> bool:
    """The routes that do inference work; probes, /metrics and /models never count or wait."""
    return path == "/classify" or (path.startswith("/v2/models/") and path.endswith("/infer"))


class AdmissionMiddleware:
    """refusal_for: the 503 a request gets before its body is read, if any, from the scope alone
    (the model it names); the in-progress cap is checked first. not_found_for: the 404 a request
    that would be refused gets instead when it names no model this server has (a 503 would have
    the client retry what can never succeed; otherwise the route answers it, 422 for a name past
    the length limit). draining: whether the server is stopping, when an admitted
    request is cancelled before its answer (see _run_or_answer_shutdown)."""

    def __init__(
        self,
        app: ASGIApp,
        max_in_progress: int,
        refusal_for: Callable[[Scope], Overloaded | None] = lambda scope: None,
        not_found_for: Callable[[Scope], ModelNotFound | None] = lambda scope: None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.max_in_progress = max_in_progress
        self.refusal_for = refusal_for
        self.not_found_for = not_found_for
        self.draining = draining
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_classification(scope["path"]):
            await self.app(scope, receive, send)
            return
        refused: CatdogError | None = (
            Overloaded(
                f"{self.in_progress} classification requests are in progress, the most this server "
                "takes at once; retry later",
                headers={"Retry-After": "1"},
            )
            if self.in_progress >= self.max_in_progress
            else self.refusal_for(scope)
        )
        if refused is not None:
            refused = self.not_found_for(scope) or refused
            # A small body is read and dropped so the connection can stay open: closing it costs the
            # client a new connection per refusal, and the server its accept and setup.
            keep = await _drained(scope, receive)
            await reject(
                scope, send, refused.status, refused.code, refused.message, refused.headers, close=not keep
            )
            return
        self.in_progress += 1
        try:
            await self._run_or_answer_shutdown(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _run_or_answer_shutdown(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; if the drain deadline cancels it before its answer began, answer 503
        shutting_down instead of the plain-text 500 uvicorn sends for a cancelled request (a
        shutdown is not a server fault, and the client should retry on another replica)."""
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if started or not self.draining() or task is None:
                raise
            # The cancellation only asked this request to end; it ends with an answer.
            task.uncancel()
            stopped = ShuttingDown(
                "the server stopped before this request was answered (drain deadline passed); retry",
                headers={"Retry-After": "1"},
            )
            await reject(scope, send, stopped.status, stopped.code, stopped.message, stopped.headers)


DRAIN_MAX_BYTES = 256 * 1024
DRAIN_TIMEOUT_S = 1.0


async def _drained(scope: Scope, receive: Receive) -> bool:
    """Read and drop a refused request's body if it is declared small and arrives at once."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if not declared.isdigit() or int(declared) > DRAIN_MAX_BYTES:
        return False
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return bool(message["type"] == "http.request")
    except TimeoutError:
        return False
