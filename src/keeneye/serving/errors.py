"""The one place where keeneye's errors (errors.py) become HTTP answers.

Every error body is `{"error": {"code": ..., "message": ...}}`. Bad input is a 4xx, never a 5xx;
503 means "retry later" (with `Retry-After` when the service itself is busy or not ready).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from keeneye.errors import BundleError, ConfigError, DataError, KeeneyeError
from keeneye.serving.batcher import Unavailable
from keeneye.serving.inputs import ImageRejected, RequestRejected

#: HTTP status per error class (the first class in the error's MRO that is listed wins).
#: RequestRejected carries its own status (400, 408, 413, 415, 503: see serving/app.py).
HTTP_STATUS: dict[type, int] = {
    Unavailable: 503,
    ImageRejected: 422,
    ConfigError: 422,
    DataError: 422,
    BundleError: 503,
    KeeneyeError: 500,
}
#: Extra headers per error class: a busy or starting service asks to be retried.
HTTP_HEADERS: dict[type, dict[str, str]] = {Unavailable: {"Retry-After": "1"}}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error body every endpoint answers with."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def http_status(exc: KeeneyeError) -> tuple[int, dict]:
    """(status, headers) for a keeneye error."""
    if isinstance(exc, RequestRejected):
        return exc.status, exc.headers
    for kind in type(exc).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind], HTTP_HEADERS.get(kind, {})
    return 500, {}  # pragma: no cover - KeeneyeError is in the table


def keeneye_error_response(exc: KeeneyeError, log_info: dict | None = None) -> JSONResponse:
    """The answer to `exc`; its code is added to the request's access-log record (`log_info["errors"]`)."""
    status, headers = http_status(exc)
    message = getattr(exc, "message", None) or str(exc)
    if log_info is not None:
        log_info.setdefault("errors", []).append(exc.code)
    return error_response(status, exc.code, message, headers or None)
