"""End to end: SIGKILL a worker in the middle of a distillation; the re-delivered job resumes from the
checkpoint it had uploaded (not from step 0), succeeds on attempt 2, and the student reloads with transformers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import (
    Receiver,
    Stack,
    all_events,
    download_artifacts,
    free_port,
    model_files,
    upload_files,
    verify,
    wait_until,
)
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MAX_STEPS = 200
CHECKPOINT_EVERY = 10
GATE_MODULE = Path(__file__).resolve().parent / "checkpoint_gate"


def _gated_worker(stack: Stack, gate: Path) -> subprocess.Popen[bytes]:
    """A job worker that stops at its job's second checkpoint (see ``checkpoint_gate/sitecustomize.py``)."""
    gate.mkdir()
    path = os.pathsep.join(p for p in (str(GATE_MODULE), stack.env.get("PYTHONPATH", "")) if p)
    return stack.start_worker({"PYTHONPATH": path, "MODELPRESS_TEST_CHECKPOINT_GATE": str(gate)})


def _checkpoint_step(latest_key: str) -> int:
    """The training step recorded in the checkpoint ``latest.json`` points at."""
    from app.storage import get_storage

    storage = get_storage()
    latest = json.loads(storage.get_bytes(latest_key))
    prefix = latest_key.removesuffix("latest.json")
    state = json.loads(storage.get_bytes(f"{prefix}{latest['version']}/state.json"))
    return int(state["step"])


def test_killed_distill_job_resumes_from_its_checkpoint(production_stack: Stack, tmp_path: Path) -> None:
    stack = production_stack
    teacher_dir = write_model_dir(tmp_path / "teacher", num_hidden_layers=4)
    gate = tmp_path / "gate"
    worker = _gated_worker(stack, gate)
    receiver = Receiver(port=free_port())
    receiver.start()
    with stack.client() as client:
        endpoint = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.progress"]})
        assert endpoint.status_code == 201, endpoint.text
        model_upload = upload_files(client, {}, model_files(teacher_dir))
        text_upload = upload_files(client, {}, {"train.txt": sample_text(60).encode()})
        spec = {
            "model": {"upload_id": model_upload},
            "training": {"upload_id": text_upload},
            "steps": [
                {
                    "method": "distill",
                    "student": {"from_teacher": {"layers": [0, 3]}},
                    "max_steps": MAX_STEPS,
                    "batch_size": 4,
                    "seq_len": 64,
                    "learning_rate": 1e-3,
                    "ce_weight": 0.5,
                    "checkpoint_every": CHECKPOINT_EVERY,
                    "eval_every": 100,
                }
            ],
        }
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        def first_checkpoint() -> str | None:
            status = client.get(f"/v1/jobs/{job_id}").json()["status"]
            assert status in {"queued", "running"}, f"job became {status} before its first checkpoint"
            marker = gate / "first-checkpoint"
            return marker.read_text() if marker.exists() else None

        latest_key = wait_until(first_checkpoint, 360, f"the first checkpoint of {job_id}")
        # The worker now waits at its second checkpoint, so the job cannot end before it is killed. Webhooks
        # flow while the job runs: the relay has a worker of its own, not the busy job worker.
        delivered = wait_until(receiver.accepted, 60, "a job.progress webhook while the job runs")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        stack.kill_worker(worker)
        receiver.stop()
        first = verify(delivered[0], endpoint.json()["secret"])
        assert first["type"] == "job.progress" and first["data"]["job_id"] == job_id
        resume_step = _checkpoint_step(latest_key)  # nobody writes checkpoints now: this is what attempt 2 finds
        assert resume_step == CHECKPOINT_EVERY  # the first checkpoint, the only one the gate let through

        stack.start_worker()  # the maintenance worker's reaper re-queues the job once the lease expires; this worker runs it
        done = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=600)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = all_events(client, job_id)
        download_artifacts(client, job_id, tmp_path / "artifact")

    types = [e["type"] for e in events]
    assert "job.retrying" in types and types.count("job.started") == 2
    second_start = [i for i, t in enumerate(types) if t == "job.started"][1]
    step_events = [(i, e["data"]) for i, e in enumerate(events) if e["type"] == "job.progress" and "step" in e["data"]]
    first_steps = [d["step"] for i, d in step_events if i < second_start]
    second = [d for i, d in step_events if i > second_start]
    # Per-step events are kept to one a second (milestones always): attempt 1 reported its first step;
    # attempt 2's first event says it resumed at the checkpoint, it trains only the rest, in order,
    # and its last event is the final step (with the final evaluation).
    assert first_steps and first_steps[0] == 1
    assert second[0].get("resumed_from_step") == resume_step, second[0]
    steps = [d["step"] for d in second]
    assert steps[0] == resume_step + 1 and steps[-1] == MAX_STEPS and steps == sorted(set(steps))
    assert "eval_perplexity" in second[-1]
    assert all("resumed_from_step" not in d for d in second[1:])

    report = json.loads((tmp_path / "artifact" / "report.json").read_text())
    details = report["steps"][0]["details"]
    assert details["resumed_from_step"] == resume_step and details["steps"] == MAX_STEPS

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact" / "model")
    assert student.config.num_hidden_layers == 2
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (1, 16, 256) and torch.isfinite(logits).all()
