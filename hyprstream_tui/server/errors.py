"""Every failure as OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.

HyprErrors map to a status by kind (InvalidInput 400, NotFound 404, Overloaded 503 with
Retry-After, ...); request validation problems are 400 `invalid_request_error` naming the field;
anything unexpected is a 500 whose body says nothing about the code (the traceback goes to the
server log only). Messages never carry characters that cannot be encoded (lone surrogates).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyprstream_tui.engine.batching import ContextLengthExceeded, Overloaded
from hyprstream_tui.errors import Conflict, HyprError, InvalidInput, NotFound, UnsafeContent

log = logging.getLogger("hyprstream.server")

RETRY_AFTER_S = 1


class APIError(Exception):
    """An HTTP error with OpenAI's body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, clean(message), type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def clean(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate echoed from a request becomes '?'."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def from_hypr(exc: HyprError, *, param: str | None = None) -> APIError:
    message = exc.worded(quoted)
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, message, param=param, code="context_length_exceeded")
    if isinstance(exc, Overloaded):
        return APIError(503, message, type="server_error", code="overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, NotFound):
        return APIError(404, message, param="model", code="model_not_found")
    if isinstance(exc, (InvalidInput, UnsafeContent)):
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(exc, Conflict):
        return APIError(409, message, code="conflict")
    log.error("request failed: %s: %s", type(exc).__name__, message)
    return APIError(500, message, type="server_error")


def quoted(setting: str) -> str:
    """How the server words a setting that a message names: its plain name, quoted."""
    return f"'{setting}'"


def internal_error() -> APIError:
    return APIError(500, "The server had an internal error while processing your request; the "
                         "details are in its log.", type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, named by its field; never the offending input itself."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: send valid JSON "
                             "with Content-Type: application/json.", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "missing" and not loc:
        message = "The request needs a JSON body."
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif first.get("type") == "too_short" and param == "messages":
        message = "The conversation is empty: 'messages' needs at least one user message."
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: '{param}'."
    else:
        message = f"Invalid value for '{param or 'body'}': {first.get('msg', 'invalid')}."
    return APIError(400, message, param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HyprError)
    async def _hypr(request: Request, exc: HyprError) -> JSONResponse:
        return from_hypr(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        message = "Unknown URL: see /docs for the API." if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, message, code=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return internal_error().response()
