"""Errors that carry their HTTP status, so one handler can answer every one the same way."""

from __future__ import annotations


class CatdogError(Exception):
    """Base class: a client-visible error with a status and a stable machine-readable code."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidImage(CatdogError):
    status, code = 415, "invalid_image"


class UnsupportedMediaType(CatdogError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(CatdogError):
    status, code = 413, "payload_too_large"


class ImageTooLarge(CatdogError):
    status, code = 413, "image_too_large"


class RequestTimeout(CatdogError):
    """The upload stalled or crawled: the connection is closed so it cannot hold memory longer."""

    status, code = 408, "request_timeout"


class ClientClosed(CatdogError):
    """The client went away before the answer: nginx's 499, in logs and metrics; never sent."""

    status, code = 499, "client_closed"


class BadRequest(CatdogError):
    status, code = 400, "bad_request"


class ModelNotFound(CatdogError):
    status, code = 404, "model_not_found"


class Unsatisfiable(CatdogError):
    status, code = 422, "constraints_unsatisfiable"


class Overloaded(CatdogError):
    status, code = 503, "overloaded"


class ModelUnavailable(CatdogError):
    """The model's batcher has crashed: its requests fail fast until the pod is restarted."""

    status, code = 503, "model_unavailable"


class NotReady(CatdogError):
    status, code = 503, "not_ready"


class ShuttingDown(CatdogError):
    """The drain deadline (CATDOG_DRAIN_TIMEOUT_S) passed before the request was answered: the
    process is stopping, not failing; another replica can take the retry."""

    status, code = 503, "shutting_down"


class DeadlineExceeded(CatdogError):
    status, code = 504, "deadline_exceeded"


PROTOCOL_PREFIX = "/v2"


def error_payload(path: str, code: str, message: str) -> dict[str, object]:
    """The error body for a path: the Open Inference Protocol's `{"error": "<message>"}` on its
    /v2 routes (with this server's code beside it), `{"error": {"code", "message"}}` elsewhere."""
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return {"error": message, "code": code}
    return {"error": {"code": code, "message": message}}
