"""The HTTP core: one ``httpx.Client``, authentication, retries with backoff, typed errors.

Retried: connection errors, 429 (after ``Retry-After``), 502, 503 and 504, with exponential backoff and full
jitter. A request is retried only where repeating it is safe: reads, PUTs and DELETEs, and POSTs the caller
marks idempotent (job creation carries an ``Idempotency-Key`` reused on every retry). Other POSTs are retried
only when the server cannot have acted: the connection was never made, or a 429 refused it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

import httpx
from pydantic import BaseModel

from modelpress._errors import APIConnectionError, error_from_response
from modelpress.schemas import retry_after_seconds

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_REGISTRY: list[Operation] = []
Model = TypeVar("Model", bound=BaseModel)


class ClientOptions(TypedDict, total=False):
    """How a client talks to the API; the defaults are :class:`HTTPClient`'s."""

    timeout: float  # seconds for each request (the upload completion waits without a read timeout)
    max_retries: int  # retries after the first try
    backoff_s: float  # the first retry's longest wait; it doubles with each retry
    http_client: httpx.Client | None  # your own client (proxies, certificates); you close it


@dataclass(frozen=True)
class Operation:
    """One API operation (method + path template). Every one the SDK calls is registered here, so a test
    can check the client against the server's OpenAPI document."""

    method: str
    path: str
    idempotent: bool = True

    def __post_init__(self) -> None:
        _REGISTRY.append(self)

    def url(self, **params: str) -> str:
        from urllib.parse import quote

        return self.path.format(**{k: quote(v, safe="") for k, v in params.items()})


def registered_operations() -> list[Operation]:
    """Every operation this client can call (the SDK's side of the OpenAPI coverage test)."""
    return list(_REGISTRY)


MAX_DELAY_S = 8.0  # the longest backoff between two tries
MAX_RETRY_AFTER_S = 120.0  # the longest a server's Retry-After is honoured


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` after the first try; delays ``base_s · 2^n`` capped at :data:`MAX_DELAY_S`, full jitter."""

    max_retries: int = 4
    base_s: float = 0.5

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return random.uniform(0, min(MAX_DELAY_S, self.base_s * 2**attempt))


def _retryable_error(exc: httpx.TransportError, idempotent: bool) -> bool:
    # A connection that was never made sent nothing: safe to repeat any request.
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    return idempotent


class Retries:
    """The retries of one request (or one transfer): each :meth:`again` waits its turn of the policy's backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.done = 0

    def again(self, response: httpx.Response | None = None) -> bool:
        """Wait before the next try (``Retry-After`` from ``response`` if it says) and return True; False, at
        once, when the retries are spent."""
        if self.done >= self.policy.max_retries:
            return False
        retry_after = retry_after_seconds(response.headers.get("Retry-After")) if response is not None else None
        time.sleep(self.policy.delay(self.done, retry_after))
        self.done += 1
        return True

    def reset(self) -> None:
        """Progress was made: the next failure starts the backoff over."""
        self.done = 0


class HTTPClient:
    """Authenticated requests to the API, plus unauthenticated ones to presigned storage URLs."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        http_client: httpx.Client | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("MODELPRESS_API_KEY")
        if not key:
            raise ValueError("no API key: pass api_key= or set MODELPRESS_API_KEY")
        self.base_url = (base_url or os.environ.get("MODELPRESS_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.retry = RetryPolicy(max_retries=max_retries, base_s=backoff_s)
        self._owns = http_client is None
        self.client = http_client or httpx.Client(timeout=timeout, follow_redirects=False)
        self._auth = {"Authorization": f"Bearer {key}", "User-Agent": "modelpress-python"}

    def close(self) -> None:
        if self._owns:
            self.client.close()

    def request(
        self,
        op: Operation,
        *,
        path_params: Mapping[str, str] | None = None,
        params: Any = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        timeout: float | httpx.Timeout | object | None = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        """Send ``op`` with retries; return the 2xx response or raise the typed :class:`APIError`.

        A DELETE retried after a lost answer may find the resource already gone: that 404 counts as done.
        """
        url = self.base_url + op.url(**(path_params or {}))
        merged = {**self._auth, **(headers or {})}
        safe = op.idempotent if idempotent is None else idempotent
        retries = Retries(self.retry)
        while True:
            try:
                response = self.client.request(
                    op.method,
                    url,
                    params=params,
                    json=json,
                    headers=merged,
                    timeout=timeout,  # type: ignore[arg-type]
                )
            except httpx.TransportError as exc:
                if not _retryable_error(exc, safe) or not retries.again():
                    raise APIConnectionError(f"{op.method} {url}: {exc}") from exc
                continue
            if response.is_success or (retries.done and op.method == "DELETE" and response.status_code == 404):
                return response
            # A 429 refused the request before it did anything; 502-504 may follow a request that ran.
            can_repeat = response.status_code == 429 or safe
            if response.status_code in RETRY_STATUSES and can_repeat and retries.again(response):
                continue
            raise error_from_response(response)

    def parse(self, op: Operation, model: type[Model], **request: Any) -> Model:
        """Send ``op`` (see :meth:`request` for the arguments) and validate its JSON answer as ``model``."""
        return model.model_validate(self.request(op, **request).json())

    @contextmanager
    def stream(
        self, op: Operation, *, path_params: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> Iterator[httpx.Response]:
        """An open streaming response (no retries here: the caller resumes, e.g. with ``Last-Event-ID``)."""
        url = self.base_url + op.url(**path_params)
        with self.client.stream(op.method, url, headers={**self._auth, **(headers or {})}) as response:
            if not response.is_success:
                response.read()
                raise error_from_response(response)
            yield response
