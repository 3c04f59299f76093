"""One error envelope for every failure, and the OpenAPI description of each status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import CatdogError, ClientClosed, error_payload
from service.schemas import (
    ErrorResponse,
)

log = logging.getLogger(__name__)


def documented_errors(body: type[BaseModel], texts: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: one body model, a description per status."""
    return {status: {"model": body, "description": text} for status, text in texts.items()}


ERRORS = documented_errors(
    ErrorResponse,
    {
        400: "Malformed request (bad multipart body, bad header).",
        408: "The upload stalled or was too slow; the connection is closed.",
        404: "Unknown model name; the message lists valid names.",
        413: "Body larger than the cap, or an image with too many pixels or too costly to decode.",
        415: "Not an accepted image type, or a corrupt/truncated image, or malformed EXIF.",
        422: "Invalid query parameter, or constraints no model meets (model=auto).",
        503: "Overloaded (see Retry-After), not ready, shutting down, or the model's batcher crashed.",
        504: "The request's deadline cannot be met.",
    },
)


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = error_payload(request.url.path, code, message)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    # Each handler records its code in request.state.outcome: OutcomeMiddleware counts it.
    @app.exception_handler(CatdogError)
    async def catdog_error(request: Request, exc: CatdogError) -> JSONResponse:
        request.state.outcome = exc.code
        if isinstance(exc, ClientClosed):
            log.debug("client closed the connection: %s", exc.message)
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.outcome = "invalid_parameter"
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(request, 422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        request.state.outcome = code
        return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request.state.outcome = "internal_error"
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal_error", "internal server error; see the server log")
