"""Errors in the OpenAI API's shape: `{"error": {"message", "type", "param", "code"}}` with its status codes."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["APIError", "SafeJSONResponse", "error_body", "error_response", "json_bytes"]


def json_bytes(content) -> bytes:
    """Compact UTF-8 JSON. Text holding a lone UTF-16 surrogate (valid in a JSON string, e.g. an echoed
    `"x\\ud800y"`, but not encodable as UTF-8) is written with \\u escapes instead, so the client gets back
    exactly what it sent rather than a failed response."""
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class SafeJSONResponse(JSONResponse):
    """A JSONResponse that cannot fail on text with lone surrogates (see `json_bytes`)."""

    def render(self, content) -> bytes:
        return json_bytes(content)

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error",
                 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 500: "server_error", 503: "service_unavailable", 504: "timeout"}


class APIError(HTTPException):
    """An error answered in OpenAI's shape. An HTTPException, so the framework passes it through untouched
    even when it is raised while the body is being read (the body-size limit)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return SafeJSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)
