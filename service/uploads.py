"""Reading uploads safely: a body cap enforced while receiving, and the two accepted body styles."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catdog_core.media import RAW_BODY_MEDIA_TYPES
from service.errors import (
    BadRequest,
    ClientClosed,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    error_payload,
)

RAW_MEDIA_TYPES = frozenset(RAW_BODY_MEDIA_TYPES)


class BodyLimitMiddleware:
    """413 before reading when Content-Length is too large; 413 mid-stream for chunked bodies;
    408 when the body stalls or crawls.

    Counting in `receive` means a chunked upload is stopped as soon as it passes the cap, instead
    of being buffered whole first. The timeouts bound how long a slow client can hold the memory
    its partial body already takes: without them 30 stalled 19 MB uploads held 573 MiB for ever.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, idle_timeout_s: float = 10.0, min_bytes_per_s: int = 0
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.min_bytes_per_s = min_bytes_per_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await reject(scope, send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await reject(scope, send, 413, PayloadTooLarge.code, self._message(int(declared)))
                return
        received = 0
        complete = False
        started = time.monotonic()

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() only waits for a disconnect: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                raise RequestTimeout(f"no body data for {self.idle_timeout_s:g} s", headers=_CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                self._check_rate(received, time.monotonic() - started, complete)
                if received > self.max_bytes:
                    # Connection: close makes the server end the connection after the 413 instead
                    # of reading and discarding the rest of an endless chunked body.
                    raise PayloadTooLarge(self._message(received, at_least=True), headers=_CLOSE)
            return message

        await self.app(scope, limited, send)

    def _check_rate(self, received: int, elapsed: float, complete: bool) -> None:
        if complete or not self.min_bytes_per_s or elapsed <= self.idle_timeout_s:
            return
        if received / elapsed < self.min_bytes_per_s:
            raise RequestTimeout(
                f"upload too slow: {received / elapsed:.0f} bytes/s after {elapsed:.0f} s; "
                f"at least {self.min_bytes_per_s} bytes/s is needed",
                headers=_CLOSE,
            )

    def _message(self, size: int, at_least: bool = False) -> str:
        return f"body is {'over ' if at_least else ''}{size} bytes; the limit is {self.max_bytes}"


# Connection: close makes the server end the connection after the answer instead of reading and
# discarding the rest of a body nobody will use.
_CLOSE = {"Connection": "close"}


async def reject(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> None:
    """Answer from ASGI middleware, before the app; close unless the body has been read. The code
    is recorded for OutcomeMiddleware, like the app's error handlers do."""
    scope.setdefault("state", {})["outcome"] = code
    body = json.dumps(error_payload(scope["path"], code, message)).encode()
    headers_: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *([(b"connection", b"close")] if close else []),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers_})
    await send({"type": "http.response.body", "body": body})


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(request: Request, max_files: int) -> list[bytes]:
    """The uploaded images' bytes, in order: every multipart `file` field, or the raw body."""
    try:
        return await _read_images(request, max_files)
    except ClientDisconnect:
        raise ClientClosed("the client closed the connection during the upload") from None


async def _read_images(request: Request, max_files: int) -> list[bytes]:
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await request.form(max_files=max_files, max_fields=max_files)
        try:
            uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
            if not uploads:
                raise BadRequest("multipart body has no `file` field with a file in it")
            return [await upload.read() for upload in uploads]
        finally:
            await form.close()
    if kind in RAW_MEDIA_TYPES:
        return [await request.body()]
    raise UnsupportedMediaType(
        f"Content-Type {kind or '(none)'} is not accepted; send multipart/form-data with `file` fields "
        f"or a raw body of {', '.join(sorted(RAW_MEDIA_TYPES))}"
    )
