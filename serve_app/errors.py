"""The error type every layer raises, and the codes of the API contract (docs/api.md).

An `ApiError` crosses Ray DeploymentHandles, so it must survive pickling: `__reduce__`
rebuilds it from exactly the arguments its `__init__` takes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from serve_app.schemas import ErrorInfo, ErrorResponse


class ErrorCode(StrEnum):
    """The `code` of an error body or of a failed job's `error_code`: the string is the contract."""

    # Request errors: answered before any work is queued.
    VALIDATION_ERROR = "VALIDATION_ERROR"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    LORA_NOT_FOUND = "LORA_NOT_FOUND"
    LORA_SOURCE_FORBIDDEN = "LORA_SOURCE_FORBIDDEN"
    LORA_INVALID = "LORA_INVALID"
    LORA_INCOMPATIBLE = "LORA_INCOMPATIBLE"
    LORA_DOWNLOAD_FAILED = "LORA_DOWNLOAD_FAILED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    SINGLE_LORA_ONLY = "SINGLE_LORA_ONLY"
    LORA_FILE_REQUIRED = "LORA_FILE_REQUIRED"
    WEBHOOK_FORBIDDEN = "WEBHOOK_FORBIDDEN"
    REQUEST_NOT_FOUND = "REQUEST_NOT_FOUND"
    UNAUTHORIZED = "UNAUTHORIZED"
    BODY_TOO_LARGE = "BODY_TOO_LARGE"
    OVERLOADED = "OVERLOADED"
    JOBS_UNAVAILABLE = "JOBS_UNAVAILABLE"  # FluxJobs or its store cannot answer now: retry
    NOT_FOUND = "NOT_FOUND"  # no such route
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    HTTP_ERROR = "HTTP_ERROR"  # any other HTTP-level refusal
    # Job failures: reported in a job's status, not as an HTTP error of the submit call.
    TIMEOUT = "TIMEOUT"
    CANCELED = "CANCELED"
    REPLICA_FAILED = "REPLICA_FAILED"
    GENERATION_FAILED = "GENERATION_FAILED"


# The members by their module-level names, as every caller spells them (`errors.TIMEOUT`).
VALIDATION_ERROR = ErrorCode.VALIDATION_ERROR
MODEL_NOT_FOUND = ErrorCode.MODEL_NOT_FOUND
LORA_NOT_FOUND = ErrorCode.LORA_NOT_FOUND
LORA_SOURCE_FORBIDDEN = ErrorCode.LORA_SOURCE_FORBIDDEN
LORA_INVALID = ErrorCode.LORA_INVALID
LORA_INCOMPATIBLE = ErrorCode.LORA_INCOMPATIBLE
LORA_DOWNLOAD_FAILED = ErrorCode.LORA_DOWNLOAD_FAILED
LIMIT_EXCEEDED = ErrorCode.LIMIT_EXCEEDED
SINGLE_LORA_ONLY = ErrorCode.SINGLE_LORA_ONLY
LORA_FILE_REQUIRED = ErrorCode.LORA_FILE_REQUIRED
WEBHOOK_FORBIDDEN = ErrorCode.WEBHOOK_FORBIDDEN
REQUEST_NOT_FOUND = ErrorCode.REQUEST_NOT_FOUND
UNAUTHORIZED = ErrorCode.UNAUTHORIZED
BODY_TOO_LARGE = ErrorCode.BODY_TOO_LARGE
OVERLOADED = ErrorCode.OVERLOADED
JOBS_UNAVAILABLE = ErrorCode.JOBS_UNAVAILABLE
NOT_FOUND = ErrorCode.NOT_FOUND
METHOD_NOT_ALLOWED = ErrorCode.METHOD_NOT_ALLOWED
HTTP_ERROR = ErrorCode.HTTP_ERROR
TIMEOUT = ErrorCode.TIMEOUT
CANCELED = ErrorCode.CANCELED
REPLICA_FAILED = ErrorCode.REPLICA_FAILED
GENERATION_FAILED = ErrorCode.GENERATION_FAILED

HTTP_STATUS: dict[ErrorCode, int] = {
    VALIDATION_ERROR: 422,
    MODEL_NOT_FOUND: 400,
    LORA_NOT_FOUND: 400,
    LORA_SOURCE_FORBIDDEN: 400,
    LORA_INVALID: 400,
    LORA_INCOMPATIBLE: 400,
    LORA_DOWNLOAD_FAILED: 400,
    LIMIT_EXCEEDED: 400,
    SINGLE_LORA_ONLY: 400,
    LORA_FILE_REQUIRED: 400,
    WEBHOOK_FORBIDDEN: 400,
    REQUEST_NOT_FOUND: 404,
    UNAUTHORIZED: 401,
    BODY_TOO_LARGE: 413,
    OVERLOADED: 503,
    JOBS_UNAVAILABLE: 503,
    NOT_FOUND: 404,
    METHOD_NOT_ALLOWED: 405,
    TIMEOUT: 504,
    CANCELED: 409,
    REPLICA_FAILED: 500,
    GENERATION_FAILED: 500,
}


class ApiError(Exception):
    """An error with a contract code, an HTTP status and details for the client.

    Args:
        code: an ErrorCode.
        message: a sentence for a person, naming the field and the value at fault.
        details: JSON-serialisable facts (field path, limit and value, ...).
    """

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(code, message, details)
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def status_code(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def to_body(self) -> dict[str, Any]:
        """The error envelope of docs/api.md (`schemas.ErrorResponse`), as JSON-ready data."""
        return ErrorResponse(error=ErrorInfo(code=self.code, message=self.message, details=self.details)).model_dump()

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.details))

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def code_for_status(status: int) -> ErrorCode:
    """The code of an HTTP-level refusal that no ApiError raised (an unknown route, a wrong method)."""
    return {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(status, HTTP_ERROR)


def validation_error(loc: list[str | int], message: str, kind: str = "value_error") -> ApiError:
    """A 422 VALIDATION_ERROR for a rule pydantic cannot check, shaped like the schema's own errors.

    Args:
        loc: the field path, e.g. ["body", "loras", 1, "path"] or ["header", "x-flux-timeout"].
        message: what is wrong with the value, for a person.
        kind: a short machine-readable type, as pydantic's `type`.
    """
    where = ".".join(str(part) for part in loc[1:]) or str(loc[0])
    problem = {"loc": [str(part) for part in loc], "msg": message, "type": kind}
    return ApiError(VALIDATION_ERROR, f"invalid request: {where}: {message}", {"errors": [problem]})
