"""Errors as the OpenAI API returns them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure a client can cause becomes an APIError whose message says what was wrong and how to fix it; anything
else is an internal error whose response names no code path (the traceback goes to the server's log only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# OpenAI's error types by status (the `type` field clients switch on).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


@dataclass
class APIError(Exception):
    """A request the server refuses: HTTP status, one-line message, and the offending parameter when there is one."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)
