"""The runner in-process against the embedded stack (SQLite + local storage): failures, chains, cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.helpers import job_event_types, load_job, model_files, reap_with_sight, register_upload, submit_job
from tests.tiny import sample_text, write_model_dir


@pytest.fixture
def tenant(embedded_stack: dict[str, str]) -> str:
    from app.auth.service import create_tenant
    from app.db import session_scope

    with session_scope() as session:
        return create_tenant(session, "runner").id


def _run(job_id: str) -> None:
    from workers.runner import JobRunner

    JobRunner(job_id).run()


def test_pickle_weights_fail_with_a_readable_reason(tenant: str, tmp_path: Path) -> None:
    files = model_files(write_model_dir(tmp_path / "m"))
    files["pytorch_model.bin"] = b"\x80\x04pickle"
    job_id = submit_job(
        tenant,
        {"model": {"upload_id": register_upload(tenant, files)}, "steps": [{"method": "quantize", "scheme": "w8a16"}]},
    )
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "failed" and job.error_type == "invalid_input"
    assert "pickle" in job.error_message and "safetensors" in job.error_message
    assert job_event_types(job_id)[-1] == "job.failed"


def test_remote_code_config_is_refused(tenant: str, tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (model_dir / "config.json").write_text(json.dumps(config))
    job_id = submit_job(
        tenant,
        {
            "model": {"upload_id": register_upload(tenant, model_files(model_dir))},
            "steps": [{"method": "quantize", "scheme": "w8a16"}],
        },
    )
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "failed" and "remote code" in job.error_message


def test_oversize_model_is_refused_before_loading(tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings

    monkeypatch.setattr(get_settings(), "max_model_bytes", 1000)
    job_id = submit_job(
        tenant,
        {
            "model": {"upload_id": register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))},
            "steps": [{"method": "quantize", "scheme": "w8a16"}],
        },
    )
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "failed" and "exceeds the limit of 1000 bytes" in job.error_message


def test_corrupted_upload_is_detected_on_download(tenant: str, tmp_path: Path) -> None:
    from app.storage import get_storage
    from app.storage_keys import upload_key

    upload_id = register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))
    get_storage().put_bytes(upload_key(tenant, upload_id, "config.json"), b'{"tampered": true}')
    job_id = submit_job(
        tenant, {"model": {"upload_id": upload_id}, "steps": [{"method": "quantize", "scheme": "w8a16"}]}
    )
    _run(job_id)
    assert "sha256" in load_job(job_id).error_message


@pytest.mark.slow
def test_prune_then_quantize_chain_keeps_the_sparsity_mask(tenant: str, tmp_path: Path) -> None:
    from app.storage import get_storage

    model = register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))
    calib = register_upload(tenant, {"calib.txt": sample_text(30).encode()})
    spec = {
        "model": {"upload_id": model},
        "calibration": {"upload_id": calib, "num_samples": 8, "seq_len": 64},
        "steps": [
            {"method": "prune", "algorithm": "sparsegpt", "pattern": "2:4"},
            {"method": "quantize", "scheme": "w4a16", "algorithm": "gptq", "group_size": 32},
        ],
    }
    job_id = submit_job(tenant, spec)
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "succeeded", job.error_message
    assert [s["status"] for s in job.steps] == ["succeeded", "succeeded"]
    assert job.summary["size_ratio"] < 0.5
    events = job_event_types(job_id)
    assert events[:2] == ["job.queued", "job.started"] and events[-1] == "job.succeeded"
    assert events.count("job.step.succeeded") == 2

    storage = get_storage()
    manifest = json.loads(storage.get_bytes(job.manifest_key))
    paths = {f["path"] for f in manifest["files"]}
    assert {"model/model.safetensors", "report.json", "report.png", "README.md"} <= paths
    out = tmp_path / "artifact.safetensors"
    storage.get_file(job.manifest_key.replace("manifest.json", "model/model.safetensors"), out)
    report = json.loads(storage.get_bytes(job.manifest_key.replace("manifest.json", "report.json")))
    assert report["evaluation"]["source"] == "calibration_heldout"
    assert [s["method"] for s in report["steps"]] == ["prune", "quantize"]

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    local = tmp_path / "model"
    for entry in manifest["files"]:
        if entry["path"].startswith("model/"):
            storage.get_file(job.manifest_key.replace("manifest.json", entry["path"]), local / entry["path"][6:])
    # Decompress to dense weights to look at the zero pattern.
    reloaded = AutoModelForCausalLM.from_pretrained(local, quantization_config=CompressedTensorsConfig(dequantize=True))
    weight = reloaded.model.layers[0].mlp.down_proj.weight.detach()
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    assert int(groups.max()) <= 2  # 2:4 survived GPTQ and int4 packing
    assert load_file(out)  # the packed checkpoint is plain safetensors


def test_cancel_before_the_first_check_point(tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.db import session_scope
    from workers import runner as runner_module

    job_id = submit_job(
        tenant,
        {
            "model": {"upload_id": register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))},
            "steps": [{"method": "quantize", "scheme": "w8a16"}],
        },
    )

    original = runner_module.Attempt.execute

    def cancel_then_execute(self, spec):  # type: ignore[no-untyped-def]
        from app.jobs import lifecycle

        with session_scope() as session:
            assert lifecycle.request_cancel(session, job_id) == "cancelling"
        return original(self, spec)

    monkeypatch.setattr(runner_module.Attempt, "execute", cancel_then_execute)
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "cancelled" and job.manifest_key is None
    events = job_event_types(job_id)
    assert events[-1] == "job.cancelled" and "job.cancelling" in events and "job.succeeded" not in events


@pytest.mark.slow
def test_structured_prune_then_distill_then_quantize(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's composition: prune(structured) → distill(student = pruned model) → quantize, one job."""
    from app.storage import get_storage
    from workers.checkpoints import CheckpointStore

    model = register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))
    text = register_upload(tenant, {"train.txt": sample_text(40).encode()})
    spec = {
        "model": {"upload_id": model},
        "calibration": {"upload_id": text, "num_samples": 8, "seq_len": 64},
        "training": {"upload_id": text},
        "steps": [
            {"method": "prune", "algorithm": "structured", "targets": {"mlp": 0.25}},
            {
                "method": "distill",
                "student": {"previous_step": True},
                "max_steps": 4,
                "batch_size": 2,
                "seq_len": 64,
                "checkpoint_every": 2,
                "ce_weight": 0.5,
            },
            {"method": "quantize", "scheme": "w8a16"},
        ],
    }
    job_id = submit_job(tenant, spec)
    saved: list[int] = []
    save = CheckpointStore.save

    def spy(store: CheckpointStore, index: int, path: Path) -> None:
        saved.append(index)
        save(store, index, path)

    monkeypatch.setattr(CheckpointStore, "save", spy)
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "succeeded", job.error_message
    report = json.loads(get_storage().get_bytes(job.manifest_key.replace("manifest.json", "report.json")))
    assert [s["method"] for s in report["steps"]] == ["prune", "distill", "quantize"]
    distilled = report["steps"][1]["details"]
    assert distilled["steps"] == 4 and distilled["student_params"] < distilled["teacher_params"]
    assert report["result"]["parameters"] < report["baseline"]["parameters"]
    # the distill step uploaded its checkpoints to storage as it went, and they went with the job's end
    assert saved and all(index == 1 for index in saved)
    assert not get_storage().list(f"checkpoints/{tenant}/{job_id}/")


def test_training_metrics_events_are_kept_to_one_a_second_milestones_always(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A training loop reports every step; the runner records one such event a second, but every
    evaluation, the first step after a resume and every one-off summary."""
    from workers import callbacks as callbacks_module

    clock = [100.0]
    monkeypatch.setattr(callbacks_module.time, "monotonic", lambda: clock[0])
    written: list[dict[str, object]] = []
    heartbeat = callbacks_module.Heartbeat("job_x", "w", object())  # type: ignore[arg-type]
    job = callbacks_module.JobCallbacks("job_x", "tenant_x", "w", [], heartbeat)
    monkeypatch.setattr(job, "progress", lambda _f, _m, data=None, force=False: written.append(dict(data or {})))

    for step in range(1, 11):  # ten steps in 0.45 s
        clock[0] += 0.05
        job.metrics({"step": step, "train_loss": 1.0})
    job.metrics({"step": 11, "train_loss": 1.0, "eval_perplexity": 9.0})
    job.metrics({"step": 12, "train_loss": 1.0, "resumed_from_step": 11})
    job.metrics({"quantize_seconds": 1.5})
    clock[0] += 1.0
    job.metrics({"step": 13, "train_loss": 1.0})
    assert [event.get("step") for event in written] == [1, 11, 12, None, 13]


def test_internal_failure_reasons_keep_sql_and_hosts_out() -> None:
    """A tenant reads why its job failed; database and storage-client errors carry SQL, hosts and
    bucket names, which stay in the worker log."""
    from botocore.exceptions import EndpointConnectionError
    from sqlalchemy.exc import DataError

    from app.storage import StorageError
    from workers.runner import internal_reason

    db = DataError("INSERT INTO job_events (data) VALUES (%(data)s)", {"data": "NaN"}, Exception("invalid json"))
    s3 = EndpointConnectionError(endpoint_url="http://minio.internal:9000/modelpress")
    wrapped = StorageError("cannot download s3://modelpress-internal/artifacts/x: An error occurred (403)")
    for exc in (db, s3, wrapped):
        reason = internal_reason(exc)
        assert reason.startswith(type(exc).__name__)
        assert "INSERT" not in reason and "minio" not in reason and "modelpress-internal" not in reason
    assert internal_reason(ValueError("shape mismatch in layer 3")) == "ValueError: shape mismatch in layer 3"


@pytest.mark.slow
def test_a_worker_that_lost_its_lease_cannot_touch_the_published_artifacts(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A stalls before uploading (its lease runs out), attempt B runs the job to success; when
    A resumes, its upload lands under its own attempt's prefix, its success is refused, and what it
    uploaded is deleted: B's artifacts stay whole and listable."""
    import threading

    from sqlalchemy import update

    from app.db import get_sessionmaker, session_scope, utcnow
    from app.jobs.models import Job
    from app.jobs.service import list_artifacts
    from app.storage import get_storage
    from app.storage_keys import artifact_prefix
    from workers import runner as runner_module

    job_id = submit_job(
        tenant,
        {
            "model": {"upload_id": register_upload(tenant, model_files(write_model_dir(tmp_path / "m")))},
            "steps": [{"method": "quantize", "scheme": "w8a16"}],
        },
    )
    from workers.publish import ArtifactPublisher

    original = ArtifactPublisher.publish
    seen: dict[str, object] = {}

    def stall_then_upload(self, out):  # type: ignore[no-untyped-def]
        if not seen:  # worker A, the first to get here
            seen["a"] = True
            # A is paused, its heartbeat thread with it (as in a stopped process), and its lease runs out.
            [heartbeat] = [t for t in threading.enumerate() if t.name == f"heartbeat-{job_id}"]
            heartbeat.stop()  # type: ignore[attr-defined]
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
            assert reap_with_sight()["requeued"] == 1
            b = runner_module.JobRunner(job_id)
            b.worker_id = "worker-b"
            b.run()
            seen["b_manifest"] = load_job(job_id).manifest_key
            seen["b_manifest_bytes"] = get_storage().get_bytes(str(seen["b_manifest"]))
            seen["b_keys"] = sorted(o.key for o in get_storage().list(artifact_prefix(tenant, job_id)))
        return original(self, out)

    monkeypatch.setattr(ArtifactPublisher, "publish", stall_then_upload)
    a = runner_module.JobRunner(job_id)
    a.worker_id = "worker-a"
    a.run()

    job = load_job(job_id)
    assert job.status == "succeeded" and job.manifest_key == seen["b_manifest"]
    assert str(job.manifest_key).startswith(artifact_prefix(tenant, job_id, job.attempts))
    assert sorted(o.key for o in get_storage().list(artifact_prefix(tenant, job_id))) == seen["b_keys"]
    assert get_storage().get_bytes(str(job.manifest_key)) == seen["b_manifest_bytes"]  # not A's manifest
    with get_sessionmaker()() as session:
        listed = list_artifacts(session, tenant, job_id, get_storage(), 60)["data"]
    assert {f["path"] for f in listed} >= {"manifest.json", "report.json"}


def test_a_checkpoint_whose_files_are_gone_restarts_the_step_from_scratch(tenant: str, tmp_path: Path) -> None:
    """``latest.json`` can outlive its version's files (pruned by an attempt that had lost its lease):
    the step then starts over instead of failing the job on a missing object."""
    import threading

    from app.storage import get_storage
    from workers.checkpoints import CheckpointStore
    from workers.runner import LeaseLost

    lost = threading.Event()
    store = CheckpointStore(get_storage(), tenant, "job_gone", lost)
    prefix = store.prefix(0)
    latest = {"version": "ckpt_1", "name": "step-00000010", "files": [{"path": "a.bin", "size": 1, "sha256": "0" * 64}]}
    get_storage().put_bytes(prefix + "latest.json", json.dumps(latest).encode())
    restored = store.restore(0, tmp_path / "ckpt")
    assert restored.is_dir() and not any(restored.iterdir())

    lost.set()
    (tmp_path / "step-00000020").mkdir()
    (tmp_path / "step-00000020" / "a.bin").write_bytes(b"x")
    with pytest.raises(LeaseLost):
        store.save(0, tmp_path / "step-00000020")
    assert json.loads(get_storage().get_bytes(prefix + "latest.json")) == latest  # nothing written or pruned


@pytest.mark.parametrize(
    ("break_model", "reason"),
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-4096]),
            "model.safetensors is truncated or corrupt: tensor",
        ),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({**json.loads((d / "config.json").read_text()), "vocab_size": 1_000_000_000})
            ),
            "tensor 'model.embed_tokens.weight' in model.safetensors has shape [256, 64], but config.json implies "
            "[1000000000, 64]",
        ),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({**json.loads((d / "config.json").read_text()), "num_hidden_layers": 1_000_000})
            ),
            "config.json num_hidden_layers is 1000000, but the checkpoint has layers 0..1",
        ),
    ],
)
def test_a_lying_or_broken_model_fails_as_invalid_input_naming_what(
    tenant: str, tmp_path: Path, break_model: Any, reason: str
) -> None:
    model_dir = write_model_dir(tmp_path / "m")
    break_model(model_dir)
    spec = {
        "model": {"upload_id": register_upload(tenant, model_files(model_dir))},
        "steps": [{"method": "quantize", "scheme": "w8a16"}],
    }
    job_id = submit_job(tenant, spec)
    _run(job_id)
    job = load_job(job_id)
    assert job.status == "failed" and job.error_type == "invalid_input"
    assert reason in job.error_message
