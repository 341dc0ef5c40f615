"""End to end: upload a tiny Llama, quantize it through the API, download and load the artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import Stack, assert_same_outputs, download_artifacts, model_files, upload_files
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _run_quantize_job(stack: Stack, tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "tiny")
    stack.start_worker()
    with stack.client() as client:
        model_upload = upload_files(client, {}, model_files(model_dir))
        eval_upload = upload_files(client, {}, {"eval.txt": sample_text(6).encode()})
        spec = {
            "model": {"upload_id": model_upload},
            "steps": [{"method": "quantize", "scheme": "w8a16", "algorithm": "rtn"}],
            "evaluation": {"upload_id": eval_upload, "seq_len": 64},
            "metadata": {"suite": "e2e"},
        }
        job = client.post("/v1/jobs", json=spec)
        assert job.status_code == 201, job.text
        done = stack.wait_for(job.json()["id"], {"succeeded", "failed", "cancelled"})
        assert done["status"] == "succeeded", done
        assert done["steps"][0]["status"] == "succeeded" and done["progress"]["fraction"] == 1.0
        assert done["summary"]["size_ratio"] < 0.75
        manifest = download_artifacts(client, done["id"], tmp_path / "artifact")
        events = [e["type"] for e in client.get(f"/v1/jobs/{done['id']}/events?limit=500").json()["data"]]
    paths = {f["path"] for f in manifest["files"]}
    assert {"model/config.json", "model/model.safetensors", "report.json", "report.png", "README.md"} <= paths
    assert events[0] == "job.queued" and events[1] == "job.started" and events[-1] == "job.succeeded"
    assert "job.progress" in events

    report = json.loads((tmp_path / "artifact" / "report.json").read_text())
    assert report["baseline"]["perplexity"] > 1 and report["result"]["perplexity"] > 1
    assert report["result"]["size_bytes"] < report["baseline"]["size_bytes"]

    assert_same_outputs(model_dir, tmp_path / "artifact" / "model")


def test_quantize_job_through_production_stack(production_stack: Stack, tmp_path: Path) -> None:
    _run_quantize_job(production_stack, tmp_path)


def test_quantize_job_through_embedded_stack(embedded_stack_procs: Stack, tmp_path: Path) -> None:
    _run_quantize_job(embedded_stack_procs, tmp_path)


def test_killed_worker_job_is_retried_and_no_partial_artifact(production_stack: Stack, tmp_path: Path) -> None:
    from app.storage import get_storage

    model_dir = write_model_dir(
        tmp_path / "bigger",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    worker = production_stack.start_worker()
    with production_stack.client() as client:
        model_upload = upload_files(client, {}, model_files(model_dir))
        calib_upload = upload_files(client, {}, {"calib.txt": sample_text(200).encode()})
        spec = {
            "model": {"upload_id": model_upload},
            "steps": [{"method": "quantize", "scheme": "w4a16", "algorithm": "gptq", "group_size": 32}],
            "calibration": {"upload_id": calib_upload, "num_samples": 32, "seq_len": 128},
        }
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        running = production_stack.wait_for(job_id, {"running", "succeeded", "failed"})
        assert running["status"] == "running"
        production_stack.kill_worker(worker)
        state = client.get(f"/v1/jobs/{job_id}").json()
        assert state["status"] == "running"  # nobody has noticed yet
        keys = [o.key for o in get_storage().list("artifacts/") if job_id in o.key]
        assert not any(k.endswith("manifest.json") for k in keys), keys

        production_stack.start_worker()  # the maintenance worker's reaper re-queues the job once the lease expires; this worker runs it
        done = production_stack.wait_for(job_id, {"succeeded", "failed"}, timeout=540)  # minutes on a loaded machine
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = [e["type"] for e in client.get(f"/v1/jobs/{job_id}/events?limit=500").json()["data"]]
        assert "job.retrying" in events and events.count("job.started") == 2
