"""Gateway errors, each carrying the HTTP status and OpenAI error `type` it is reported with.

Everything the gateway refuses or fails at is raised as a `FusionError`; the app turns it into OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` so that clients written for OpenAI handle it unchanged.
"""

from __future__ import annotations

import time
from typing import Any


class FusionError(Exception):
    """Base class: `status` and `type` follow OpenAI's conventions for the same failure."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class InvalidRequest(FusionError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(FusionError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(FusionError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(FusionError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        names = ", ".join(available) or "(none configured)"
        super().__init__(f"The model '{model}' does not exist. Available models: {names}.", param="model")


class NotFound(FusionError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RequestTooLarge(FusionError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ValidationFailed(FusionError):
    status = 422
    type = "invalid_request_error"
    code = "validation_error"


class QueueFull(FusionError):
    """The model's bounded queue is full: the client should back off and retry."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, model: str, retry_after_s: int = 1) -> None:
        super().__init__(
            f"Model '{model}' has too many queued requests; retry after {retry_after_s}s "
            "(or raise `max_queue` for this model in the config).",
            headers={"Retry-After": str(retry_after_s)},
        )


class BudgetExceeded(FusionError):
    """An API key spent its requests or tokens budget for the current window: 429 until the window resets."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, key_name: str, budget: str, limit: int, period: str, resets_at: float, now: float) -> None:
        wait = max(1, int(resets_at - now + 0.999))
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets_at))
        super().__init__(
            f"API key '{key_name}' has used its budget of {limit} {budget} per {period}; it resets at "
            f"{when} (in {wait}s).", code=f"{budget}_budget_exceeded", headers={"Retry-After": str(wait)})


class ClientDisconnected(FusionError):
    """The client left before its answer was ready: the work was cancelled (nginx's 499, only ever logged)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class UpstreamRateLimited(FusionError):
    """The upstream answered 429: passed on with the upstream's own Retry-After, marked as the upstream's."""

    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"

    def __init__(self, model: str, message: str, retry_after: str | None) -> None:
        headers = {"Retry-After": retry_after} if retry_after and retry_after.isascii() and retry_after.strip() else {}
        super().__init__(f"the upstream of model '{model}' is rate limiting: {message}", headers=headers)


class UpstreamError(FusionError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class Unavailable(FusionError):
    status = 503
    type = "server_error"
    code = "unavailable"


class GatewayTimeout(FusionError):
    status = 504
    type = "timeout_error"
    code = "timeout"
