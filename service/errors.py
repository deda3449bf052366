"""The error contract: every error is a JSON :class:`ErrorBody`, with the status table the OpenAPI document
shows, and the handlers that answer FastAPI's and Starlette's exceptions in that schema."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.metrics import Metrics

MAX_DETAIL = 300  # characters of an error message; an error never echoes the request back
IMAGE_ERROR_STATUS = {"empty": 422, "corrupt": 422, "unsupported": 415, "too_large": 413, "expansion": 413,
                      "bad_output": 422}
ERRORS = {
    400: "malformed request",
    401: "missing or wrong API key",
    413: "upload or image too large, or over a cost limit (the detail names it)",
    415: "not an image, or an unsupported format",
    422: "a missing or invalid field, an empty, truncated or corrupt image, or an output format that cannot carry it",
    429: "this client has too many pixels in flight (see Retry-After)",
    500: "internal error",
    503: "queue full, the deadline cannot be met, or model not ready (see Retry-After, there when waiting can help)",
    504: "request timed out",
}


class ErrorBody(BaseModel):
    """Every error's body."""

    detail: str


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, each with the :class:`ErrorBody` schema."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail[:MAX_DETAIL]}, status_code=status, headers=headers)


def rejection(metrics: Metrics, status: int, detail: str, quality: str, reason: str,
              headers: dict | None = None) -> JSONResponse:
    """A refused request: counted under ``reason`` and under its status and ``quality`` (a
    :class:`~model.Quality` value or ``unknown``), answered in the error schema."""
    metrics.rejections.labels(reason).inc()
    metrics.requests.labels(quality, str(status)).inc()
    return error_response(status, detail, headers)


def validation_detail(error: RequestValidationError) -> str:
    """Where and what, for each problem; never the offending input."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_detail(error))


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """Anything unexpected: counted, and answered without its message (which may hold internal state)."""
    metrics: Metrics = request.app.state.metrics
    metrics.rejections.labels("internal_error").inc()
    return error_response(500, ERRORS[500])


def register_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, HTTP errors and unexpected failures in the :class:`ErrorBody` schema."""
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
