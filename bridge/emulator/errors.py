"""The errors a portal answers with, and the HTTP status each usually comes with."""

from __future__ import annotations

from typing import Any

STATUS = {
    "QUERY_LIMIT_EXCEEDED": 503,
    "OVERLOAD_LIMIT": 503,
    "OPERATION_TIME_LIMIT": 429,
    "expired_token": 401,
    "invalid_token": 401,
    "NO_AUTH_FOUND": 401,
    "INTERNAL_SERVER_ERROR": 500,
    "ERROR_UNEXPECTED_ANSWER": 500,
    "WRONG_AUTH_TYPE": 403,
    "ACCESS_DENIED": 403,
    "insufficient_scope": 403,
    "WRONG_LICENSE": 402,
    "ERROR_METHOD_NOT_FOUND": 404,
    "PORTAL_DELETED": 404,
    "ERROR_ARGUMENT": 400,
    "ERROR_CORE": 400,
    "ERROR_BATCH_LENGTH_EXCEEDED": 400,
    "ERROR_BATCH_METHOD_NOT_ALLOWED": 400,
    "invalid_grant": 400,
    "invalid_request": 400,
    "invalid_client": 401,
}

DESCRIPTIONS = {
    "QUERY_LIMIT_EXCEEDED": "Too many requests",
    "OVERLOAD_LIMIT": "REST API is blocked due to overload.",
    "OPERATION_TIME_LIMIT": "Method is blocked due to operation time limit.",
    "expired_token": "The access token provided has expired.",
    "invalid_token": "The access token provided is invalid.",
    "NO_AUTH_FOUND": "Wrong authorization data",
    "INTERNAL_SERVER_ERROR": "Internal server error",
    "ERROR_UNEXPECTED_ANSWER": "Server returned an unexpected response.",
    "WRONG_AUTH_TYPE": "Current authorization type is denied for this method",
    "ACCESS_DENIED": "Access denied.",
    "insufficient_scope": "The request requires higher privileges than provided.",
    "WRONG_LICENSE": "Wrong license.",
    "ERROR_METHOD_NOT_FOUND": "Method not found!",
    "PORTAL_DELETED": "Portal was deleted",
}


class RestError(Exception):
    """A REST failure: ``{"error": code, "error_description": ...}`` with its HTTP status."""

    def __init__(self, code: str, description: str | None = None, *, status: int | None = None):
        self.code = code
        self.description = description if description is not None else DESCRIPTIONS.get(code, "")
        self.status = status if status is not None else STATUS.get(code, 400)
        super().__init__(f"{code}: {self.description}")

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


def argument(description: str) -> RestError:
    return RestError("ERROR_ARGUMENT", description)
