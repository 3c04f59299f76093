"""What every classification route does around the core: its deadline, and watching for a client
that leaves (so its queued work is cancelled, not run for nobody)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, CatdogError, ClientClosed

T = TypeVar("T")
MAX_DEADLINE_MS = 3_600_000


def deadline_from(request: Request, timeout_ms: float | None, start: float) -> float | None:
    """The request's deadline on the monotonic clock: X-Deadline-Ms wins over the route's own
    timeout (a query parameter, or the protocol's `timeout` parameter)."""
    header = request.headers.get("X-Deadline-Ms")
    budget = timeout_ms
    if header is not None:
        try:
            budget = float(header)
        except ValueError as exc:
            raise BadRequest("X-Deadline-Ms must be a number of milliseconds") from exc
        if not 0 < budget <= MAX_DEADLINE_MS:
            raise BadRequest(f"X-Deadline-Ms must be in (0, {MAX_DEADLINE_MS}]")
    return start + budget / 1000 if budget is not None else None


async def read_body(request: Request) -> bytes:
    """The whole body (BodyLimitMiddleware caps it while it arrives); 499 if the client leaves."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientClosed("the client closed the connection during the upload") from None


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run the work while watching the connection: a client that leaves cancels its queued jobs
    (they are dropped before they run) and the request ends as 499 client_closed."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The request itself was cancelled (uvicorn does so once the drain deadline passes):
        # asyncio.wait leaves the work running, and its queued images would run for nobody.
        task.cancel()
        raise
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
