"""``AsyncModelPress``: the same client for asyncio code. Each call runs the synchronous client's method in a
worker thread (``asyncio.to_thread``), so an event loop is never blocked by a request, an upload or a download;
the retry, resume and verification logic is the one the synchronous client has, not a second copy of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar, Unpack

from modelpress._client import ModelPress
from modelpress._http import ClientOptions
from modelpress.schemas import Event

P = ParamSpec("P")
R = TypeVar("R")
_DONE = object()


def _offload(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    run.__doc__ = fn.__doc__
    return run


async def _aiter(events: Iterator[Event]) -> AsyncIterator[Event]:
    while True:
        item = await asyncio.to_thread(next, events, _DONE)
        if item is _DONE:
            return
        yield item  # type: ignore[misc]


class AsyncUploads:
    def __init__(self, client: ModelPress) -> None:
        uploads = client.uploads
        self.upload = _offload(uploads.upload)
        self.create = _offload(uploads.create)
        self.get = _offload(uploads.get)
        self.parts = _offload(uploads.parts)
        self.renew_urls = _offload(uploads.renew_urls)
        self.complete = _offload(uploads.complete)


class AsyncJobs:
    def __init__(self, client: ModelPress) -> None:
        jobs = self._jobs = client.jobs
        self.create = _offload(jobs.create)
        self.get = _offload(jobs.get)
        self.list = _offload(jobs.list)
        self.cancel = _offload(jobs.cancel)
        self.events = _offload(jobs.events)
        self.wait = _offload(jobs.wait)
        self.artifacts = _offload(jobs.artifacts)
        self.download = _offload(jobs.download)

    def stream(self, job_id: str, *, after: int = 0, timeout: float | None = None) -> AsyncIterator[Event]:
        """Every event after ``after`` until the job finishes (reconnecting; see :meth:`Jobs.stream`)."""
        return _aiter(self._jobs.stream(job_id, after=after, timeout=timeout))


class AsyncWebhooks:
    def __init__(self, client: ModelPress) -> None:
        hooks = client.webhooks
        self.create = _offload(hooks.create)
        self.list = _offload(hooks.list)
        self.get = _offload(hooks.get)
        self.update = _offload(hooks.update)
        self.delete = _offload(hooks.delete)
        self.rotate_secret = _offload(hooks.rotate_secret)
        self.deliveries = _offload(hooks.deliveries)
        self.redeliver = _offload(hooks.redeliver)


class AsyncKeys:
    def __init__(self, client: ModelPress) -> None:
        self.list = _offload(client.keys.list)
        self.create = _offload(client.keys.create)
        self.revoke = _offload(client.keys.revoke)


class AsyncLimits:
    def __init__(self, client: ModelPress) -> None:
        self.get = _offload(client.limits.get)


class AsyncAdmin:
    def __init__(self, client: ModelPress) -> None:
        admin = client.admin
        self.create_tenant = _offload(admin.create_tenant)
        self.list_tenants = _offload(admin.list_tenants)
        self.get_tenant = _offload(admin.get_tenant)
        self.update_tenant = _offload(admin.update_tenant)
        self.create_key = _offload(admin.create_key)
        self.list_keys = _offload(admin.list_keys)
        self.revoke_key = _offload(admin.revoke_key)


class AsyncModelPress:
    """The asyncio client: ``await amp.jobs.create(...)``, ``async for event in amp.jobs.stream(job_id)``.

    Same arguments as :class:`ModelPress`. Objects it returns are the synchronous client's models; follow a
    job with ``await amp.jobs.wait(job.id)`` rather than ``job.wait()``, which would block the loop.
    """

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, **options: Unpack[ClientOptions]
    ) -> None:
        self._sync = ModelPress(api_key, base_url, **options)
        self.uploads = AsyncUploads(self._sync)
        self.jobs = AsyncJobs(self._sync)
        self.webhooks = AsyncWebhooks(self._sync)
        self.keys = AsyncKeys(self._sync)
        self.limits = AsyncLimits(self._sync)
        self.admin = AsyncAdmin(self._sync)

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> AsyncModelPress:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
