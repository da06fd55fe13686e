"""Every failure of `tunesmith api` as OpenAI's error JSON {"error": {message, type, param, code}}.

OpenAI clients turn that shape into their own exceptions (BadRequestError, RateLimitError, ...). A client
error is a 4xx naming what to fix; a bug is a 500 whose body says only that the server failed: the
exception and its traceback go to the server's log, never to the client (they can hold paths and data).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith.api")


class ApiError(Exception):
    """A request the server refuses, raised anywhere in a handler and answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object, also sent as the last event of a stream that fails."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error body with its HTTP status."""
    return JSONResponse(error_body(message, kind, param, code), status)


def server_failure(err: BaseException) -> str:
    """Log a bug with its traceback; return the message the client gets (no exception text)."""
    log.error("request failed", exc_info=(type(err), err, err.__traceback__))
    return "The server failed while answering; its log has the details."


def add_error_handlers(app: FastAPI) -> None:
    """Answer every failure (ours, FastAPI's validation, Starlette's HTTP errors, bugs) as OpenAI's error JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.kind, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = str(first.get("msg", "invalid value"))[:200]
        return error_response(400, f"Invalid request: {param or 'body'}: {message}.", param=param)

    @app.exception_handler(TunesmithError)
    async def _user_error(request: Request, err: TunesmithError) -> JSONResponse:
        return error_response(400, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, server_failure(err), "server_error")
