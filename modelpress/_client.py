"""The client: :class:`ModelPress` and its resources (uploads, jobs, webhooks, keys, limits, admin)."""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, Unpack

import httpx
from pydantic import BaseModel, PrivateAttr
from tqdm.auto import tqdm

from modelpress import schemas
from modelpress._errors import APIConnectionError, APIError, JobFailedError, UploadError
from modelpress._http import RETRY_STATUSES, ClientOptions, HTTPClient, Operation, Retries
from modelpress._sse import iter_sse
from modelpress._transfer import Downloader, PieceUploader, SafeBar, hash_files, plan_pieces

T = TypeVar("T")
#: A step: a plain dict (``{"method": "quantize", "scheme": "w8a16"}``) or a step model (``modelpress.steps``).
StepLike = Mapping[str, Any] | BaseModel
#: An input: a local file or folder (uploaded), an ``s3://`` URI, an upload id (``upl_…``), or the API's own
#: source object (``{"upload_id": …}`` / ``{"uri": …}``).
InputLike = str | PathLike[str] | Mapping[str, Any]

# Every operation of the API this client calls; ``tests/sdk/test_openapi.py`` holds them against /openapi.json.
CREATE_UPLOAD = Operation("POST", "/v1/uploads")  # a duplicate is harmless: an unused upload expires
GET_UPLOAD = Operation("GET", "/v1/uploads/{upload_id}")
UPLOAD_PARTS = Operation("GET", "/v1/uploads/{upload_id}/parts")
RENEW_UPLOAD_URLS = Operation("POST", "/v1/uploads/{upload_id}/urls")
COMPLETE_UPLOAD = Operation("POST", "/v1/uploads/{upload_id}/complete")
CREATE_JOB = Operation("POST", "/v1/jobs")  # idempotent through its Idempotency-Key
LIST_JOBS = Operation("GET", "/v1/jobs")
GET_JOB = Operation("GET", "/v1/jobs/{job_id}")
CANCEL_JOB = Operation("POST", "/v1/jobs/{job_id}/cancel", idempotent=False)
LIST_EVENTS = Operation("GET", "/v1/jobs/{job_id}/events")
STREAM_EVENTS = Operation("GET", "/v1/jobs/{job_id}/events/stream")
LIST_ARTIFACTS = Operation("GET", "/v1/jobs/{job_id}/artifacts")
CREATE_WEBHOOK = Operation("POST", "/v1/webhooks", idempotent=False)
LIST_WEBHOOKS = Operation("GET", "/v1/webhooks")
GET_WEBHOOK = Operation("GET", "/v1/webhooks/{endpoint_id}")
UPDATE_WEBHOOK = Operation("PATCH", "/v1/webhooks/{endpoint_id}")
DELETE_WEBHOOK = Operation("DELETE", "/v1/webhooks/{endpoint_id}")
ROTATE_WEBHOOK_SECRET = Operation("POST", "/v1/webhooks/{endpoint_id}/rotate-secret", idempotent=False)
LIST_DELIVERIES = Operation("GET", "/v1/webhooks/{endpoint_id}/deliveries")
REDELIVER = Operation("POST", "/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver", idempotent=False)
LIST_KEYS = Operation("GET", "/v1/keys")
CREATE_KEY = Operation("POST", "/v1/keys", idempotent=False)
REVOKE_KEY = Operation("DELETE", "/v1/keys/{key_id}")
GET_LIMITS = Operation("GET", "/v1/limits")
ADMIN_CREATE_TENANT = Operation("POST", "/v1/admin/tenants", idempotent=False)
ADMIN_LIST_TENANTS = Operation("GET", "/v1/admin/tenants")
ADMIN_GET_TENANT = Operation("GET", "/v1/admin/tenants/{tenant_id}")
ADMIN_UPDATE_TENANT = Operation("PATCH", "/v1/admin/tenants/{tenant_id}")
ADMIN_CREATE_KEY = Operation("POST", "/v1/admin/tenants/{tenant_id}/keys", idempotent=False)
ADMIN_LIST_KEYS = Operation("GET", "/v1/admin/tenants/{tenant_id}/keys")
ADMIN_REVOKE_KEY = Operation("DELETE", "/v1/admin/keys/{key_id}")


class Page(Generic[T]):
    """One page of a list; iterating it walks every following page too (``for job in mp.jobs.list()``)."""

    def __init__(self, data: list[T], has_more: bool, next_page: Callable[[], Page[T]] | None) -> None:
        self.data, self.has_more, self._next = data, has_more, next_page

    def next_page(self) -> Page[T] | None:
        return self._next() if self.has_more and self._next is not None else None

    def __iter__(self) -> Iterator[T]:
        page: Page[T] | None = self
        while page is not None:
            yield from page.data
            page = page.next_page()


class _Identified(Protocol):
    @property
    def id(self) -> str | int: ...


Item = TypeVar("Item", bound=_Identified)
Query = Sequence[tuple[str, str | int | bool]]


def _list(
    http: HTTPClient,
    op: Operation,
    parse: Callable[[Any], Item],
    query: Query = (),
    *,
    path_params: Mapping[str, str] | None = None,
    after: str | int | None = None,
) -> Page[Item]:
    """The page of a cursor-paginated list after ``after`` (``query`` holds the other parameters); its next
    page is the one after its last item's id."""
    params = [*query, *([("after", after)] if after is not None else [])]
    body = http.request(op, path_params=path_params, params=params).json()
    items = [parse(item) for item in body["data"]]
    last = items[-1].id if items else after
    return Page(
        items, bool(body["has_more"]), lambda: _list(http, op, parse, query, path_params=path_params, after=last)
    )


def _step_dict(step: StepLike) -> dict[str, Any]:
    if isinstance(step, BaseModel):
        return step.model_dump(mode="json")
    return dict(step)


# ---------------------------------------------------------------- uploads


class Uploads:
    """``/v1/uploads``: declare files, PUT them to presigned URLs, complete. :meth:`upload` does it all."""

    def __init__(self, client: ModelPress) -> None:
        self._client, self._http = client, client._http

    def create(self, files: Sequence[Mapping[str, Any]]) -> schemas.Upload:
        """Declare files (``{"path", "size", "sha256"}`` each); the answer carries a PUT URL per file or part."""
        return self._http.parse(CREATE_UPLOAD, schemas.Upload, json={"files": [dict(f) for f in files]})

    def get(self, upload_id: str) -> schemas.Upload:
        return self._http.parse(GET_UPLOAD, schemas.Upload, path_params={"upload_id": upload_id})

    def parts(self, upload_id: str) -> schemas.UploadProgress:
        """What storage holds of the upload: each file whole or not, and the parts of multipart files."""
        return self._http.parse(UPLOAD_PARTS, schemas.UploadProgress, path_params={"upload_id": upload_id})

    def renew_urls(self, upload_id: str) -> schemas.Upload:
        """Fresh PUT URLs for every file and part, and as long again to complete the upload."""
        return self._http.parse(RENEW_UPLOAD_URLS, schemas.Upload, path_params={"upload_id": upload_id})

    def complete(self, upload_id: str) -> schemas.Upload:
        """The server verifies every size and sha256 (minutes for a large model: no read timeout)."""
        no_read_timeout = httpx.Timeout(60.0, read=None)
        return self._http.parse(
            COMPLETE_UPLOAD, schemas.Upload, path_params={"upload_id": upload_id}, timeout=no_read_timeout
        )

    def upload(
        self,
        path: str | PathLike[str],
        *,
        upload_id: str | None = None,
        progress: bool = False,
        concurrency: int = 4,
    ) -> schemas.Upload:
        """Upload a file or a folder and complete it: hash (streaming), declare, PUT every file and part
        (``concurrency`` at a time, each retried), complete. With ``upload_id``, resume that upload: ask the
        server which parts it holds, renew the URLs, and PUT only what is missing.

        Raises :class:`UploadError` (carrying the upload id to resume with) when a PUT fails for good.
        """
        files = hash_files(Path(path), progress)
        if upload_id is None:
            upload = self.create([{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files])
            targets, received = upload.targets or [], None
        else:
            upload = self.get(upload_id)
            declared = {(f.path, f.size, f.sha256) for f in upload.files}
            if declared != {(f.path, f.size, f.sha256) for f in files}:
                raise ValueError(f"{path} no longer matches the files upload {upload_id} declared: start a new upload")
            if upload.status == "complete":
                return upload
            if upload.status == "expired":
                raise UploadError("the upload expired and its files were deleted: start a new one", upload_id)
            received = self.parts(upload_id)
            targets = self.renew_urls(upload_id).targets or []
        pieces = plan_pieces(files, targets, received)
        total = sum(f.size for f in files)
        left = sum(p.length for p in pieces)
        upload_ref = upload.id
        with tqdm(
            total=total, initial=total - left, unit="B", unit_scale=True, desc="upload", disable=not progress
        ) as bar:
            uploader = PieceUploader(
                self._http, targets, lambda: self.renew_urls(upload_ref).targets or [], concurrency, SafeBar(bar)
            )
            try:
                uploader.run(pieces)
            except (APIConnectionError, APIError, OSError) as exc:
                raise UploadError(f"upload {upload_ref} interrupted: {exc}", upload_ref) from exc
        return self.complete(upload.id)

    def source(self, value: InputLike, *, progress: bool = False, concurrency: int = 4) -> dict[str, Any]:
        """The API's source object for an input: local paths are uploaded first (see :data:`InputLike`)."""
        if isinstance(value, Mapping):
            return dict(value)
        text = str(value)
        if Path(text).exists():
            return {"upload_id": self.upload(text, progress=progress, concurrency=concurrency).id}
        if text.startswith("s3://"):
            return {"uri": text}
        if text.startswith("upl_"):
            return {"upload_id": text}
        raise FileNotFoundError(f"no such file or folder: {text} (nor an s3:// URI or an upload id)")


# ---------------------------------------------------------------- jobs


class Job(schemas.JobOut):
    """A job, with the verbs to follow it: :meth:`wait`, :meth:`download`, :meth:`cancel`, :meth:`events`."""

    _jobs: Jobs | None = PrivateAttr(default=None)

    def _bound(self) -> Jobs:
        if self._jobs is None:
            raise RuntimeError("this Job is not bound to a client; get it through ModelPress().jobs")
        return self._jobs

    def _update(self, other: schemas.JobOut) -> Job:
        for name in type(self).model_fields:
            if name != "webhook_secret" or getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        return self

    def refresh(self) -> Job:
        """Re-read the job from the API (in place)."""
        return self._update(self._bound().get(self.id))

    def cancel(self) -> Job:
        return self._update(self._bound().cancel(self.id))

    def events(self, after: int = 0) -> Page[schemas.Event]:
        return self._bound().events(self.id, after=after)

    def stream(self, after: int = 0, timeout: float | None = None) -> Iterator[schemas.Event]:
        return self._bound().stream(self.id, after=after, timeout=timeout)

    def artifacts(self) -> schemas.ArtifactList:
        return self._bound().artifacts(self.id)

    def wait(self, *, progress: bool = False, timeout: float | None = None, check: bool = False) -> Job:
        """Follow the job until it finishes (server-sent events, reconnecting with ``Last-Event-ID``; polling
        if the stream keeps failing). ``progress`` draws a bar; ``check`` raises :class:`JobFailedError` unless
        it succeeded; ``timeout`` raises :class:`TimeoutError`."""
        with tqdm(total=100, desc=self.id, disable=not progress, bar_format="{l_bar}{bar}| {elapsed} {postfix}") as bar:
            for event in self.stream(timeout=timeout):
                fraction = event.data.get("progress")
                if event.type == "job.progress" and isinstance(fraction, int | float):
                    bar.update(round(fraction * 100) - bar.n)
                    bar.set_postfix_str(str(event.data.get("message", ""))[:60])
                elif event.type == "job.succeeded":
                    bar.update(100 - bar.n)
        self.refresh()
        if check and self.status != "succeeded":
            raise JobFailedError(self)
        return self

    def download(self, dest: str | PathLike[str], *, progress: bool = False, concurrency: int = 4) -> list[Path]:
        """Download every artifact into ``dest``, each checked against the manifest's sha256 (see
        :meth:`Jobs.download`)."""
        return self._bound().download(self.id, dest, progress=progress, concurrency=concurrency)


class Jobs:
    """``/v1/jobs``: create (uploading local inputs), get, list, cancel, events, stream, artifacts, download."""

    def __init__(self, client: ModelPress) -> None:
        self._client, self._http = client, client._http

    def _job(self, payload: Any) -> Job:
        job = Job.model_validate(payload)
        job._jobs = self
        return job

    def create(
        self,
        *,
        model: InputLike,
        steps: Sequence[StepLike],
        calibration: InputLike | None = None,
        evaluation: InputLike | None = None,
        training: InputLike | None = None,
        calibration_options: Mapping[str, Any] | None = None,
        evaluation_options: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        webhook_url: str | None = None,
        hardware: str = "auto",
        low_memory: bool | None = None,
        idempotency_key: str | None = None,
        progress: bool = False,
        upload_concurrency: int = 4,
    ) -> Job:
        """Submit a job. Local files and folders are uploaded first (resumable, verified); the submission
        carries one ``Idempotency-Key`` (yours, or a fresh one) on every retry, so it makes exactly one job."""

        def source(value: InputLike, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
            found = self._client.uploads.source(value, progress=progress, concurrency=upload_concurrency)
            return {**found, **(options or {})}

        spec: dict[str, Any] = {
            "model": source(model),
            "steps": [_step_dict(step) for step in steps],
            "metadata": dict(metadata or {}),
            "hardware": hardware,
            "low_memory": low_memory,
        }
        if calibration is not None:
            spec["calibration"] = source(calibration, calibration_options)
        if evaluation is not None:
            spec["evaluation"] = source(evaluation, evaluation_options)
        if training is not None:
            spec["training"] = source(training)
        if webhook_url is not None:
            spec["webhook_url"] = webhook_url
        key = idempotency_key or f"modelpress-python-{uuid.uuid4()}"
        response = self._http.request(CREATE_JOB, json=spec, headers={"Idempotency-Key": key}, idempotent=True)
        return self._job(response.json())

    def get(self, job_id: str) -> Job:
        return self._job(self._http.request(GET_JOB, path_params={"job_id": job_id}).json())

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[Job]:
        """Newest first; iterate the page to walk every later page too."""
        statuses = [status] if isinstance(status, str) else builtins.list(status or [])
        query: builtins.list[tuple[str, str | int | bool]] = [("limit", limit)]
        query += [("status", s) for s in statuses]
        query += [(f"metadata[{k}]", v) for k, v in (metadata or {}).items()]
        return _list(self._http, LIST_JOBS, self._job, query, after=after)

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: ``cancelling`` until the worker stops at the next layer/step."""
        return self._job(self._http.request(CANCEL_JOB, path_params={"job_id": job_id}).json())

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> Page[schemas.Event]:
        """The job's event log, oldest first; iterate to walk every page."""
        path = {"job_id": job_id}
        return _list(
            self._http, LIST_EVENTS, schemas.Event.model_validate, [("limit", limit)], path_params=path, after=after
        )

    def stream(self, job_id: str, *, after: int = 0, timeout: float | None = None) -> Iterator[schemas.Event]:
        """Every event after ``after`` as it happens, until the job finishes. A cut stream is reopened with
        ``Last-Event-ID`` (nothing missed, nothing twice); if it keeps failing, events are polled instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, retries = after, Retries(self._http.retry)
        while True:
            try:
                headers = {"Last-Event-ID": str(last), "Accept": "text/event-stream"}
                with self._http.stream(STREAM_EVENTS, path_params={"job_id": job_id}, headers=headers) as response:
                    for frame in iter_sse(response.iter_lines()):
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                        if frame is None:
                            continue
                        event = schemas.Event.model_validate_json(frame.data)
                        last = event.id
                        retries.reset()
                        yield event
            except (httpx.TransportError, APIConnectionError, APIError) as exc:
                if isinstance(exc, APIError) and exc.status_code not in RETRY_STATUSES:
                    raise
                if not retries.again(exc.response if isinstance(exc, APIError) else None):
                    yield from self._poll(job_id, last, deadline)
                    return
                continue
            # The server ends the stream once the job is finished and every event was sent; a proxy may
            # also end it early, and then it is reopened.
            if self.get(job_id).done:
                yield from self.events(job_id, after=last)  # written between its last read and the end
                return

    def _poll(self, job_id: str, after: int, deadline: float | None, interval: float = 2.0) -> Iterator[schemas.Event]:
        last = after
        while True:
            finished = self.get(job_id).done
            for event in self.events(job_id, after=last):
                last = event.id
                yield event
            if finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish in time")
            time.sleep(interval)

    def wait(self, job_id: str, *, progress: bool = False, timeout: float | None = None, check: bool = False) -> Job:
        """Follow a job until it finishes (see :meth:`Job.wait`)."""
        return self.get(job_id).wait(progress=progress, timeout=timeout, check=check)

    def artifacts(self, job_id: str) -> schemas.ArtifactList:
        """A succeeded job's files with size, sha256 and a short-lived download URL."""
        return self._http.parse(LIST_ARTIFACTS, schemas.ArtifactList, path_params={"job_id": job_id})

    def download(
        self, job_id: str, dest: str | PathLike[str], *, progress: bool = False, concurrency: int = 4
    ) -> builtins.list[Path]:
        """Download every artifact of a succeeded job into ``dest`` (``model/``, ``report.json``, …).

        Files go to a staging folder beside ``dest`` first; a cut transfer resumes with an HTTP ``Range``;
        each file is checked against the manifest's size and sha256, and only when all are right do they move
        into ``dest``. A mismatch raises :class:`IntegrityError` and leaves nothing in ``dest``.
        """
        downloader = Downloader(self._http, lambda: self.artifacts(job_id), concurrency, progress)
        return downloader.download(self.artifacts(job_id), Path(dest))


# ---------------------------------------------------------------- webhooks, keys, limits, admin


class Webhooks:
    """``/v1/webhooks`` (scope ``webhooks:manage``). To check a delivery's signature use
    :func:`modelpress.webhooks.verify`."""

    def __init__(self, client: ModelPress) -> None:
        self._http = client._http

    def create(
        self, url: str, *, events: Sequence[str] | None = None, description: str = ""
    ) -> schemas.WebhookEndpointWithSecret:
        """Register a receiver; the answer's ``secret`` is shown only this once."""
        body = {"url": url, "events": list(events) if events is not None else None, "description": description}
        return self._http.parse(CREATE_WEBHOOK, schemas.WebhookEndpointWithSecret, json=body)

    def list(self, *, limit: int = 20, after: str | None = None) -> Page[schemas.WebhookEndpoint]:
        return _list(self._http, LIST_WEBHOOKS, schemas.WebhookEndpoint.model_validate, [("limit", limit)], after=after)

    def get(self, endpoint_id: str) -> schemas.WebhookEndpoint:
        return self._http.parse(GET_WEBHOOK, schemas.WebhookEndpoint, path_params={"endpoint_id": endpoint_id})

    def update(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        events: Sequence[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> schemas.WebhookEndpoint:
        """Change the fields given (``enabled=True`` re-enables an endpoint a 410 disabled)."""
        fields = {"url": url, "events": list(events) if events is not None else None, "description": description}
        body = {k: v for k, v in {**fields, "enabled": enabled}.items() if v is not None}
        return self._http.parse(
            UPDATE_WEBHOOK, schemas.WebhookEndpoint, path_params={"endpoint_id": endpoint_id}, json=body
        )

    def delete(self, endpoint_id: str) -> None:
        self._http.request(DELETE_WEBHOOK, path_params={"endpoint_id": endpoint_id})

    def rotate_secret(self, endpoint_id: str, *, overlap_s: int | None = None) -> schemas.WebhookEndpointWithSecret:
        """A new secret (shown once); the old one keeps signing for ``overlap_s`` (server default 24 h)."""
        body = {"overlap_s": overlap_s} if overlap_s is not None else None
        path = {"endpoint_id": endpoint_id}
        return self._http.parse(ROTATE_WEBHOOK_SECRET, schemas.WebhookEndpointWithSecret, path_params=path, json=body)

    def deliveries(
        self, endpoint_id: str, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> Page[schemas.WebhookDelivery]:
        """Newest first, each with its attempts; iterate to walk every page."""
        query: builtins.list[tuple[str, str | int | bool]] = [("limit", limit)]
        query += [("status", status)] if status is not None else []
        path = {"endpoint_id": endpoint_id}
        return _list(
            self._http, LIST_DELIVERIES, schemas.WebhookDelivery.model_validate, query, path_params=path, after=after
        )

    def redeliver(self, endpoint_id: str, delivery_id: str) -> schemas.WebhookDelivery:
        """Queue a delivery again, with the same ``webhook-id``."""
        path = {"endpoint_id": endpoint_id, "delivery_id": delivery_id}
        return self._http.parse(REDELIVER, schemas.WebhookDelivery, path_params=path)


class Keys:
    """``/v1/keys`` (scope ``keys:manage``): this tenant's API keys."""

    def __init__(self, client: ModelPress) -> None:
        self._http = client._http

    def list(self, *, include_revoked: bool = False) -> builtins.list[schemas.ApiKey]:
        return self._http.parse(LIST_KEYS, schemas.KeyList, params={"include_revoked": include_revoked}).data

    def create(self, *, name: str = "default", scopes: Sequence[str] | None = None) -> schemas.ApiKeyCreated:
        """A new key with (a subset of) the calling key's scopes; its ``key`` is shown only this once."""
        body: dict[str, Any] = {"name": name, **({"scopes": list(scopes)} if scopes is not None else {})}
        return self._http.parse(CREATE_KEY, schemas.ApiKeyCreated, json=body)

    def revoke(self, key_id: str) -> None:
        self._http.request(REVOKE_KEY, path_params={"key_id": key_id})


class LimitsResource:
    """``/v1/limits``: this tenant's effective limits and current usage."""

    def __init__(self, client: ModelPress) -> None:
        self._http = client._http

    def get(self) -> schemas.Limits:
        return self._http.parse(GET_LIMITS, schemas.Limits)


class Admin:
    """``/v1/admin`` (scope ``admin``): tenants, their quota overrides and keys, across tenants."""

    def __init__(self, client: ModelPress) -> None:
        self._http = client._http

    def create_tenant(self, name: str, **overrides: int) -> schemas.Tenant:
        body = {"name": name, **overrides}
        return self._http.parse(ADMIN_CREATE_TENANT, schemas.Tenant, json=body)

    def list_tenants(self, *, limit: int = 50, after: str | None = None) -> Page[schemas.Tenant]:
        return _list(self._http, ADMIN_LIST_TENANTS, schemas.Tenant.model_validate, [("limit", limit)], after=after)

    def get_tenant(self, tenant_id: str) -> schemas.Tenant:
        return self._http.parse(ADMIN_GET_TENANT, schemas.Tenant, path_params={"tenant_id": tenant_id})

    def update_tenant(self, tenant_id: str, overrides: Mapping[str, int | None]) -> schemas.Tenant:
        """Change quota overrides; only the keys given change, and ``None`` returns one to the default."""
        path = {"tenant_id": tenant_id}
        return self._http.parse(ADMIN_UPDATE_TENANT, schemas.Tenant, path_params=path, json=dict(overrides))

    def create_key(
        self, tenant_id: str, *, name: str = "default", scopes: Sequence[str] | None = None
    ) -> schemas.ApiKeyCreated:
        body: dict[str, Any] = {"name": name, **({"scopes": list(scopes)} if scopes is not None else {})}
        return self._http.parse(
            ADMIN_CREATE_KEY, schemas.ApiKeyCreated, path_params={"tenant_id": tenant_id}, json=body
        )

    def list_keys(self, tenant_id: str, *, include_revoked: bool = False) -> list[schemas.ApiKey]:
        params = {"include_revoked": include_revoked}
        return self._http.parse(
            ADMIN_LIST_KEYS, schemas.KeyList, path_params={"tenant_id": tenant_id}, params=params
        ).data

    def revoke_key(self, key_id: str) -> None:
        self._http.request(ADMIN_REVOKE_KEY, path_params={"key_id": key_id})


class ModelPress:
    """The ModelPress API client.

    ``api_key`` defaults to ``$MODELPRESS_API_KEY`` and ``base_url`` to ``$MODELPRESS_BASE_URL`` (else
    ``http://127.0.0.1:8000``). Requests are retried with backoff on connection errors, 429 and 502-504
    (``max_retries`` times, the first wait up to ``backoff_s``, doubling). Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, **options: Unpack[ClientOptions]
    ) -> None:
        self._http = HTTPClient(api_key, base_url, **options)
        self.uploads = Uploads(self)
        self.jobs = Jobs(self)
        self.webhooks = Webhooks(self)
        self.keys = Keys(self)
        self.limits = LimitsResource(self)
        self.admin = Admin(self)

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ModelPress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
