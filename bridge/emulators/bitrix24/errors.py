"""The errors a portal answers with, and the HTTP status each usually comes with.

Statuses follow the ``rest`` module where it raises the error itself (``OAuthException`` is
401 unless it says otherwise, ``AccessException`` 403, ``PORTAL_DELETED`` 403, the load limiter
429); the rest follow Bitrix24's documentation. Clients must decide on ``error``, not on the
status: statuses differ between portal versions, and ``/_emulator/faults`` can inject any.
"""

from __future__ import annotations

from typing import Any

STATUS = {
    # Limits.
    "QUERY_LIMIT_EXCEEDED": 503,
    "OVERLOAD_LIMIT": 503,  # the documented status; the module's auth layer answers 401
    "OPERATION_TIME_LIMIT": 429,
    # The token and the OAuth layer (rest/lib/oauth/auth.php).
    "expired_token": 401,
    "invalid_token": 401,
    "NO_AUTH_FOUND": 401,
    "insufficient_scope": 401,
    "APPLICATION_NOT_FOUND": 401,
    "authorization_error": 401,
    "user_access_error": 401,
    "INVALID_CREDENTIALS": 401,
    "ERROR_OAUTH": 401,
    "CONNECTION_ERROR": 401,
    "PAYMENT_REQUIRED": 402,
    "METHOD_CONFIRM_WAITING": 401,
    "METHOD_CONFIRM_DENIED": 403,
    # Access and configuration.
    "WRONG_AUTH_TYPE": 403,
    "ACCESS_DENIED": 403,
    "WRONG_LICENSE": 403,
    "PORTAL_DELETED": 403,
    "ERROR_METHOD_NOT_FOUND": 404,
    # Server faults.
    "INTERNAL_SERVER_ERROR": 500,
    "ERROR_UNEXPECTED_ANSWER": 500,
    # Arguments.
    "ERROR_ARGUMENT": 400,
    "ERROR_CORE": 400,
    "ERROR_WRONG_HANDLER_URL": 400,
    "ERROR_UNSUPPORTED_PROTOCOL": 400,
    "ERROR_BATCH_LENGTH_EXCEEDED": 400,
    "ERROR_BATCH_METHOD_NOT_ALLOWED": 400,
    # The OAuth server's own answers.
    "invalid_grant": 400,
    "invalid_request": 400,
    "invalid_client": 401,
}

DESCRIPTIONS = {
    "QUERY_LIMIT_EXCEEDED": "Too many requests",
    "OVERLOAD_LIMIT": "REST API is blocked due to overload.",
    "OPERATION_TIME_LIMIT": "Method is blocked due to operation time limit.",
    "expired_token": "The access token provided has expired",
    "invalid_token": "The access token provided is invalid",
    "NO_AUTH_FOUND": "Wrong authorization data",
    "insufficient_scope": "The request requires higher privileges than provided by the token",
    "APPLICATION_NOT_FOUND": "Application not found",
    "authorization_error": "Unable to authorize user",
    "user_access_error": "The user does not have access to the application.",
    "INVALID_CREDENTIALS": "Invalid request credentials",
    "ERROR_OAUTH": "Error verifying the access token",
    "CONNECTION_ERROR": "Error connecting to authorization server",
    "PAYMENT_REQUIRED": "Payment required",
    "METHOD_CONFIRM_WAITING": "Waiting for confirmation",
    "METHOD_CONFIRM_DENIED": "Method call denied",
    "WRONG_AUTH_TYPE": "Current authorization type is denied for this method",
    "ACCESS_DENIED": "Access denied!",
    "WRONG_LICENSE": "This feature is not enabled for the current license:",
    "PORTAL_DELETED": "Portal was deleted",
    "ERROR_METHOD_NOT_FOUND": "Method not found!",
    "INTERNAL_SERVER_ERROR": "Internal server error",
    "ERROR_UNEXPECTED_ANSWER": "Server returned an unexpected response.",
    "ERROR_WRONG_HANDLER_URL": "Wrong handler URL",
    "ERROR_UNSUPPORTED_PROTOCOL": "Unsupported handler protocol",
    "ERROR_BATCH_LENGTH_EXCEEDED": "Max batch length exceeded",
    "ERROR_BATCH_METHOD_NOT_ALLOWED": "Method is not allowed for batch usage",
}


class RestError(Exception):
    """A REST failure: ``{"error": code, "error_description": ...}`` with its HTTP status."""

    def __init__(
        self,
        code: str,
        description: str | None = None,
        *,
        status: int | None = None,
        argument: str | None = None,
    ) -> None:
        self.code = code
        self.description = description if description is not None else DESCRIPTIONS.get(code, "")
        self.status = status if status is not None else STATUS.get(code, 400)
        self.argument = argument  # Exceptions\ArgumentException names the parameter
        super().__init__(f"{code}: {self.description}")

    def body(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"error": self.code, "error_description": self.description}
        if self.argument is not None:
            answer["argument"] = self.argument
        return answer


def argument(description: str, name: str | None = None) -> RestError:
    return RestError("ERROR_ARGUMENT", description, argument=name)
