"""The one mapping from exceptions to HTTP status codes and the JSON error shape.

Routes hold no try/except: they raise from ``app.errors`` and this module answers. Raw
exception text from third-party code never reaches clients.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors as e
from app.api.middleware import error_body
from app.api.responses import JSONBytes

log = logging.getLogger(__name__)

#: class → (status, OpenAI-style error type); the first matching base class wins.
STATUS: list[tuple[type[e.RealignError], int, str]] = [
    (e.TooManyInputsError, 413, "invalid_request_error"),
    (e.InputError, 422, "invalid_request_error"),
    (e.AuthError, 401, "authentication_error"),
    (e.NotFoundError, 404, "not_found_error"),
    (e.OverloadError, 429, "rate_limit_error"),
    (e.NotReadyError, 503, "service_unavailable"),
    (e.EncoderError, 500, "server_error"),
]


def error_response(
    status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None
) -> JSONBytes:
    return JSONBytes(
        error_body(message, type_, code),
        status_code=status,
        headers=headers,
    )


def _realign_error(_: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, e.RealignError)
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            headers = None
            if isinstance(exc, e.OverloadError):
                headers = {"Retry-After": str(exc.retry_after_s)}
            if isinstance(exc, e.AuthError):
                headers = {"WWW-Authenticate": "Bearer"}
            if status >= 500:
                log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc.__cause__)
            return error_response(status, exc.message, type_, exc.code, headers)
    log.error("unmapped error %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal error", "server_error", "internal_error")


def _validation_error(_: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errs):
        return error_response(
            400, "the request body is not valid JSON", "invalid_request_error", "invalid_json"
        )
    parts = []
    for err in errs[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return error_response(422, "; ".join(parts) + more, "invalid_request_error", "invalid_input")


def _http_error(_: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, StarletteHTTPException)
    codes = {
        404: "not_found",
        405: "method_not_allowed",
        413: "body_too_large",
        415: "unsupported_media_type",
        400: "bad_request",
    }
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(
        exc.status_code,
        str(exc.detail),
        type_,
        codes.get(exc.status_code, "http_error"),
        dict(exc.headers) if exc.headers else None,
    )


def _unexpected(_: Request, exc: Exception) -> JSONBytes:
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal error", "server_error", "internal_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.RealignError, _realign_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
