"""The client's reliability against the real embedded stack, with real faults from a loopback proxy:
a connection cut mid-upload, a lost 201, a cut event stream, a 429 with Retry-After, typed problems."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from modelpress import ModelPress, NotFoundError, UnprocessableEntityError, UploadError
from tests.helpers import MIB, Stack
from tests.sdk.proxy import FaultProxy, Rule

QUANTIZE = [{"method": "quantize", "scheme": "w8a16", "algorithm": "rtn"}]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(5 * MIB + 10_000))  # 6 parts of 1 MiB
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("hidden folders are not uploaded")
    return folder


def _put_keys(proxy: FaultProxy, since: int = 0) -> Counter[str]:
    """Storage key of every PUT that reached the proxy (from the signed token in its URL)."""
    from app.signing import verify

    counts: Counter[str] = Counter()
    for request in proxy.requests("PUT", "/v1/storage/")[since:]:
        counts[verify("test-signing-secret", request.path.rsplit("/", 1)[1])["key"]] += 1
    return counts


@pytest.mark.slow  # a stack of processes per test: `make test` runs it
def test_a_cut_part_is_sent_again_and_only_it(mp: ModelPress, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Rule("PUT", "/v1/storage/", "drop_request_body", nth=3, value=300_000))
    upload = mp.uploads.upload(_folder(tmp_path), concurrency=2)
    assert upload.status == "complete"
    assert sorted(f.path for f in upload.files) == ["config.json", "model.safetensors"]
    counts = _put_keys(proxy)
    assert len(counts) == 7  # six parts and config.json
    assert sorted(counts.values()) == [1, 1, 1, 1, 1, 1, 2]  # the cut one twice, every other once


@pytest.mark.slow  # a stack of processes per test: `make test` runs it
def test_an_interrupted_upload_resumes_with_what_the_server_holds(
    proxied_stack: Stack, proxy: FaultProxy, tmp_path: Path
) -> None:
    folder = _folder(tmp_path)
    proxy.add(Rule("PUT", "/v1/storage/", "drop_request_body", nth=4, value=1000))
    with ModelPress(api_key=proxied_stack.key, base_url=proxy.url, max_retries=0) as impatient:
        with pytest.raises(UploadError) as failed:
            impatient.uploads.upload(folder, concurrency=1)
        upload_id = failed.value.upload_id
        held = impatient.uploads.parts(upload_id)
    model = next(f for f in held.files if f.path == "model.safetensors")
    held_parts = {p.part_number for p in model.parts or []}
    # PUTs in order: config.json, parts 1, 2, then part 3 is cut (part 4 may have started meanwhile).
    assert held.status == "pending" and {1, 2} <= held_parts and 3 not in held_parts

    before = len(proxy.requests("PUT", "/v1/storage/"))
    with ModelPress(api_key=proxied_stack.key, base_url=proxy.url, backoff_s=0.05) as client:
        done = client.uploads.upload(folder, upload_id=upload_id)
    assert done.id == upload_id and done.status == "complete"
    resent = _put_keys(proxy, before)
    part_numbers = {int(key.rsplit("/", 1)[1]) for key in resent if ".parts/" in key}
    assert part_numbers == set(range(1, 7)) - held_parts  # only the missing parts went up again
    assert all(n == 1 for n in resent.values())


@pytest.mark.slow  # a stack of processes per test: `make test` runs it
def test_a_lost_201_makes_exactly_one_job(mp: ModelPress, proxy: FaultProxy, tmp_path: Path) -> None:
    upload = mp.uploads.upload(_folder(tmp_path))
    # The server creates the job; its 201 is replaced by a 503 on the way back.
    proxy.add(Rule("POST", "/v1/jobs", "replace_status", value=503))
    job = mp.jobs.create(model=upload.id, steps=QUANTIZE, metadata={"try": "lost-201"})
    posts = proxy.requests("POST", "/v1/jobs")
    assert len(posts) == 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    jobs = list(mp.jobs.list(metadata={"try": "lost-201"}))
    assert [j.id for j in jobs] == [job.id] and job.status == "queued"


@pytest.mark.slow  # a stack of processes per test: `make test` runs it
def test_a_cut_event_stream_resumes_from_the_last_event(mp: ModelPress, proxy: FaultProxy, tmp_path: Path) -> None:
    upload = mp.uploads.upload(_folder(tmp_path))
    job = mp.jobs.create(model=upload.id, steps=QUANTIZE)
    job.cancel()  # no worker: queued → cancelled, two events
    proxy.add(Rule("GET", f"/v1/jobs/{job.id}/events/stream", "cut_response_after", value=b"\n\n"))
    streamed = list(job.stream())
    logged = list(job.events())
    assert [e.type for e in logged] == ["job.queued", "job.cancelled"]
    assert [e.id for e in streamed] == [e.id for e in logged]  # nothing missed, nothing twice
    streams = proxy.requests("GET", f"/v1/jobs/{job.id}/events/stream")
    assert len(streams) == 2 and streams[1].headers["last-event-id"] == str(logged[0].id)
    assert job.wait().status == "cancelled"


@pytest.mark.slow  # a stack of processes per test: `make test` runs it
def test_429_waits_for_retry_after(mp: ModelPress, proxy: FaultProxy) -> None:
    proxy.add(Rule("GET", "/v1/limits", "replace_status", value=429, headers={"Retry-After": "1"}))
    started = time.monotonic()
    limits = mp.limits.get()
    assert time.monotonic() - started >= 1.0
    assert len(proxy.requests("GET", "/v1/limits")) == 2 and limits.usage.queued_jobs == 0


def test_errors_are_typed_problems(mp: ModelPress, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as missing:
        mp.jobs.get("job_nope")
    assert missing.value.status_code == 404 and missing.value.problem.title == "Not Found"
    upload = mp.uploads.upload(_folder(tmp_path))
    with pytest.raises(UnprocessableEntityError) as invalid:
        mp.jobs.create(model=upload.id, steps=[{"method": "quantize", "scheme": "w3a3"}])
    assert invalid.value.type.endswith("/validation")
    assert any(e.field.startswith("steps.0") for e in invalid.value.errors)
