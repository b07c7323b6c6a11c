"""One error hierarchy for the whole gateway.

Backends and services raise these; `gateway.app` maps them to the error
envelope of the API family the request came through (OpenAI or Hugging Face).
Nothing ever classifies an error by parsing its message.
"""

from __future__ import annotations


class GatewayError(Exception):
    status_code = 500
    openai_type = "server_error"
    hf_error_type = "generation"
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
        self.headers = dict(headers or {})


class ConfigError(GatewayError):
    """The configuration (file, `GATEWAY_*` environment or flags) is invalid; raised before serving."""


class InvalidRequest(GatewayError):
    status_code = 400
    openai_type = "invalid_request_error"
    hf_error_type = "validation"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"

    def __init__(self, param: str, why: str = "is not supported by this server") -> None:
        super().__init__(f"Parameter '{param}' {why}.", param=param)


class Unauthorized(GatewayError):
    status_code = 401
    openai_type = "authentication_error"
    hf_error_type = "authentication"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(GatewayError):
    status_code = 404
    openai_type = "invalid_request_error"
    hf_error_type = "not_found"
    code = "model_not_found"

    def __init__(self, model: str, served: list[str]) -> None:
        listing = ", ".join(served) if served else "(none)"
        super().__init__(
            f"The model '{model}' does not exist on this server. Served models: {listing}.",
            param="model",
        )


class Conflict(InvalidRequest):
    """The change asked for clashes with what is served (a model name already taken)."""

    status_code = 409
    code = "conflict"


class TaskNotSupported(InvalidRequest):
    code = "task_not_supported"


class ModelNotReady(GatewayError):
    """The model is still loading (or failed to load)."""

    status_code = 503
    openai_type = "server_error"
    hf_error_type = "loading"
    code = "model_not_ready"

    def __init__(self, message: str, *, estimated_time: float | None = None) -> None:
        headers = {}
        if estimated_time is not None:
            headers["Retry-After"] = str(max(1, round(estimated_time)))
        super().__init__(message, headers=headers)
        self.estimated_time = estimated_time


class InsufficientMemory(ModelNotReady):
    """A model does not fit in the memory budget and no idle model can be unloaded to make room."""

    code = "insufficient_memory"

    def __init__(self, message: str) -> None:
        super().__init__(message, estimated_time=5.0)


class Overloaded(GatewayError):
    status_code = 429
    openai_type = "rate_limit_error"
    hf_error_type = "overloaded"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})
        self.retry_after = retry_after


class BackendFailure(GatewayError):
    """Compute failed inside a backend."""

    status_code = 500
    openai_type = "server_error"
    hf_error_type = "generation"
    code = "backend_error"


class UpstreamError(GatewayError):
    """An upstream deployment failed or answered with an error."""

    status_code = 502
    openai_type = "server_error"
    hf_error_type = "upstream"
    code = "upstream_error"

    def __init__(self, message: str, *, status_code: int = 502, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status_code = status_code


class Forbidden(GatewayError):
    """A valid key without the scope the path needs."""

    status_code = 403
    openai_type = "permission_error"
    hf_error_type = "forbidden"
    code = "insufficient_scope"


class RateLimited(GatewayError):
    """A key over its requests or tokens per minute."""

    status_code = 429
    openai_type = "rate_limit_error"
    hf_error_type = "rate_limit"
    code = "rate_limit_exceeded"


class ShuttingDown(GatewayError):
    """The server is draining before it exits: try another replica."""

    status_code = 503
    openai_type = "server_error"
    hf_error_type = "unavailable"
    code = "shutting_down"


class InputTooLarge(InvalidRequest):
    """Over one of the input limits (server.max_*)."""

    code = "input_too_large"
