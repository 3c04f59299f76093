"""Reading uploads safely: a body cap enforced while receiving, and the two accepted body styles."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

RAW_MEDIA_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream"}
)


class BodyLimitMiddleware:
    """413 before reading when Content-Length is too large; 413 mid-stream for chunked bodies.

    Counting in `receive` means a chunked upload is stopped as soon as it passes the cap, instead
    of being buffered whole first.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reject(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await _reject(send, 413, PayloadTooLarge.code, self._message(int(declared)))
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Connection: close makes the server end the connection after the 413 instead
                    # of reading and discarding the rest of an endless chunked body.
                    raise PayloadTooLarge(self._message(received, at_least=True), headers={"Connection": "close"})
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return f"body is {'over ' if at_least else ''}{size} bytes; the limit is {self.max_bytes}"


async def _reject(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(request: Request, max_files: int) -> list[bytes]:
    """The uploaded images' bytes, in order: every multipart `file` field, or the raw body."""
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
