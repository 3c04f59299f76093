import asyncio

from starlette.requests import Request
from starlette.types import Message

from service.request_control import unless_client_leaves


def test_a_cancelled_request_cancels_its_work_too() -> None:
    """uvicorn cancels a request still running at the drain deadline; the work it awaits (queued
    images) must end with it rather than run for nobody."""

    async def scenario() -> bool:
        async def receive() -> Message:
            await asyncio.Event().wait()  # a client that stays connected
            raise AssertionError("unreachable")

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        started, work_cancelled = asyncio.Event(), asyncio.Event()

        async def work() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                work_cancelled.set()
                raise

        handler = asyncio.ensure_future(unless_client_leaves(request, work()))
        await started.wait()
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
        await asyncio.sleep(0)  # the work's cancellation is delivered on its next step
        return work_cancelled.is_set()

    assert asyncio.run(scenario())
