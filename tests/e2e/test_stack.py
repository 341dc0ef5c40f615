"""End to end: upload a tiny Llama, quantize it through the API, download and load the artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import Stack
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _upload_dir(client: httpx.Client, files: dict[str, bytes]) -> str:
    body = {"files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in files.items()]}
    created = client.post("/v1/uploads", json=body)
    assert created.status_code == 201, created.text
    for target in created.json()["targets"]:
        httpx.put(target["url"], content=files[target["path"]], timeout=60).raise_for_status()
    done = client.post(f"/v1/uploads/{created.json()['id']}/complete")
    assert done.status_code == 200, done.text
    return str(created.json()["id"])


def _model_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _download_artifacts(client: httpx.Client, job_id: str, dest: Path) -> dict:  # type: ignore[type-arg]
    listing = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert listing.status_code == 200, listing.text
    files = listing.json()["data"]
    for item in files:
        data = httpx.get(item["url"], timeout=60).content
        assert hashlib.sha256(data).hexdigest() == item["sha256"], item["path"]
        target = dest / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["files"]:  # the manifest vouches for every file
        assert hashlib.sha256((dest / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    return manifest  # type: ignore[no-any-return]


def _run_quantize_job(stack: Stack, tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "tiny")
    stack.start_worker()
    with stack.client() as client:
        model_upload = _upload_dir(client, _model_files(model_dir))
        eval_upload = _upload_dir(client, {"eval.txt": sample_text(6).encode()})
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
        manifest = _download_artifacts(client, done["id"], tmp_path / "artifact")
        events = [e["type"] for e in client.get(f"/v1/jobs/{done['id']}/events?limit=500").json()["data"]]
    paths = {f["path"] for f in manifest["files"]}
    assert {"model/config.json", "model/model.safetensors", "report.json", "report.png", "README.md"} <= paths
    assert events[0] == "job.queued" and events[1] == "job.started" and events[-1] == "job.succeeded"
    assert "job.progress" in events

    report = json.loads((tmp_path / "artifact" / "report.json").read_text())
    assert report["baseline"]["perplexity"] > 1 and report["result"]["perplexity"] > 1
    assert report["result"]["size_bytes"] < report["baseline"]["size_bytes"]

    original = AutoModelForCausalLM.from_pretrained(model_dir)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact" / "model")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(ids).logits, quantized(ids).logits
    assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()
    assert quantized.config.quantization_config is not None


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
        model_upload = _upload_dir(client, _model_files(model_dir))
        calib_upload = _upload_dir(client, {"calib.txt": sample_text(200).encode()})
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
        done = production_stack.wait_for(job_id, {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = [e["type"] for e in client.get(f"/v1/jobs/{job_id}/events?limit=500").json()["data"]]
        assert "job.retrying" in events and events.count("job.started") == 2
