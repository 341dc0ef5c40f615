"""Typed exceptions. Every error the API answers is an RFC 9457 problem; it travels on the exception."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from modelpress.schemas import retry_after_seconds


class FieldError(BaseModel):
    """One entry of a problem's ``errors``: which field, and what is wrong with it."""

    model_config = ConfigDict(extra="allow")

    field: str = ""
    message: str = ""
    type: str | None = None


class Problem(BaseModel):
    """An ``application/problem+json`` body (RFC 9457)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str = ""
    status: int | None = None
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] = []


class ModelPressError(Exception):
    """Base class of every error this client raises."""


class APIConnectionError(ModelPressError):
    """The server could not be reached (or the connection broke) and retries ran out."""


class APIError(ModelPressError):
    """The API answered with an error status; ``problem`` is its RFC 9457 body."""

    def __init__(self, status_code: int, problem: Problem, response: httpx.Response | None = None) -> None:
        self.status_code = status_code
        self.problem = problem
        self.response = response
        message = f"{status_code} {problem.title}" + (f": {problem.detail}" if problem.detail else "")
        super().__init__(message)

    @property
    def type(self) -> str:
        return self.problem.type

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str | None:
        return self.problem.detail

    @property
    def errors(self) -> list[FieldError]:
        return self.problem.errors


class BadRequestError(APIError):
    """400."""


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key."""


class PermissionDeniedError(APIError):
    """403: the key lacks the scope (or a storage URL is invalid or expired)."""


class NotFoundError(APIError):
    """404 (also another tenant's resource)."""


class ConflictError(APIError):
    """409: a state conflict, e.g. cancelling a finished job."""


class ContentTooLargeError(APIError):
    """413: over a size limit."""


class UnprocessableEntityError(APIError):
    """422: validation failed; ``errors`` names the fields."""


class RateLimitError(APIError):
    """429 after the retries: a quota or the request rate; ``retry_after`` in seconds when the server said."""

    @property
    def retry_after(self) -> float | None:
        return retry_after_seconds(self.response.headers.get("Retry-After")) if self.response is not None else None


class InternalServerError(APIError):
    """5xx after the retries."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: ContentTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


class IntegrityError(ModelPressError):
    """A downloaded file's size or sha256 does not match what the server vouched for."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(f"{path}: sha256 {actual} does not match the manifest's {expected}")


class UploadError(ModelPressError):
    """An upload could not be finished; resume it with ``upload_id`` (parts already PUT are kept)."""

    def __init__(self, message: str, upload_id: str) -> None:
        self.upload_id = upload_id
        super().__init__(f"{message} (resume with upload id {upload_id})")


class JobFailedError(ModelPressError):
    """The job ended ``failed`` or ``cancelled`` where success was required."""

    def __init__(self, job: Any) -> None:
        self.job = job
        error = getattr(job, "error", None)
        reason = f": {error.type}: {error.message}" if error is not None else ""
        super().__init__(f"job {job.id} {job.status}{reason}")


def error_from_response(response: httpx.Response) -> APIError:
    """The typed exception for an error response, its problem parsed (or synthesized from a non-JSON body)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: Problem | None = None
    if isinstance(body, dict):
        try:
            problem = Problem.model_validate(body)
        except ValueError:  # not a problem document after all (a proxy's JSON error page)
            problem = None
    if problem is None:
        problem = Problem(title=response.reason_phrase, status=response.status_code, detail=response.text[:500] or None)
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIError
    return cls(response.status_code, problem, response)
