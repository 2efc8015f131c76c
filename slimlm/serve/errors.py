"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure the app returns.

FastAPI's own 422 for body validation becomes a 400 naming the field, since OpenAI clients (and the
OpenAI API itself) treat every bad field as a 400.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class EngineStopped(RuntimeError):
    """The engine thread is not running (shutting down, or it failed): a 503."""


class QueueFull(Exception):
    """More requests in flight than ``--max-queue`` allows: a 429."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


_FIELD = re.compile(r"^([a-z_]+) must\b")


def bad_value(e: ValueError, rename: dict[str, str] | None = None) -> APIError:
    """A ``SamplingParams`` / engine ``ValueError`` as a 400; its message starts with the field it is about."""
    message = str(e)
    match = _FIELD.match(message)
    param = match.group(1) if match else None
    if param and rename:
        param = rename.get(param, param)
    return APIError(400, message, param)


def as_api_error(e: BaseException) -> APIError:
    """How a failure of one request is reported to that request's client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e))
    if isinstance(e, EngineStopped):
        return APIError(503, str(e))
    if isinstance(e, ValueError):
        return bad_value(e)
    logger.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
    # Union members add their type names to the location; the top-level field is what a client sent.
    param = loc[0] if loc and not loc[0].isdigit() else None
    where = ".".join(loc) or "body"
    return error_response(400, f"{where}: {first.get('msg')}", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    @app.exception_handler(QueueFull)
    @app.exception_handler(EngineStopped)
    async def _api_error(_: Request, exc: Exception) -> JSONResponse:
        e = as_api_error(exc)
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
