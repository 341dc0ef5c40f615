"""One job through the real stack, seen from the outside: its metrics on every /metrics, its life in the logs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    Stack,
    empty_postgres,
    eventually,
    free_port,
    model_files,
    service_env,
    start_stack,
    upload_files,
)
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: answers 200 and keeps each delivery's ``webhook-id`` and type."""

    def __init__(self) -> None:
        self.deliveries: dict[str, str] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                receiver.deliveries[self.headers["webhook-id"]] = body["type"]
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def observed_stack(tmp_path: Path, s3_endpoint: str, pg_migrated: None) -> Iterator[tuple[Stack, int]]:
    """The production stack with JSON logs, and /metrics served by the maintenance worker (its port is yielded)."""
    empty_postgres()
    env = {**service_env(tmp_path, stack="production", s3_endpoint=s3_endpoint), "MODELPRESS_LOG_FORMAT": "json"}
    port = free_port()
    (tmp_path / "prom-maintenance").mkdir()
    maintenance = {"MODELPRESS_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom-maintenance")}
    for stack in start_stack(tmp_path, env, maintenance_env=maintenance):
        yield stack, port


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, keyed by name and labels."""
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """One sample's value (0 when the series does not exist yet)."""
    return float(samples.get((name, frozenset(labels.items())), 0.0))


def total(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """The sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def json_lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    """The JSON log lines of a process (start-up banners before logging is set up are not JSON)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_one_job_moves_metrics_and_logs_by_exactly_what_happened(
    observed_stack: tuple[Stack, int], tmp_path: Path
) -> None:
    stack, maintenance_port = observed_stack
    api_metrics = f"{stack.base_url}/metrics"
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    model = model_files(write_model_dir(tmp_path / "tiny"))
    request_id = "e2e-submit-0001"
    with stack.client() as client:
        model_upload = upload_files(client, {}, model)
        eval_upload = upload_files(client, {}, {"eval.txt": sample_text(6).encode()})
        spec = {
            "model": {"upload_id": model_upload},
            "steps": [{"method": "quantize", "scheme": "w8a16", "algorithm": "rtn"}],
            "evaluation": {"upload_id": eval_upload, "seq_len": 64},
            "webhook_url": hook,
        }
        created = client.post("/v1/jobs", json=spec, headers={"X-Request-ID": request_id})
        assert created.status_code == 201, created.text
        assert created.headers["x-request-id"] == request_id
        job_id = created.json()["id"]

        # No worker yet: the job waits in the broker's cpu list and the database says queued.
        before = scrape(api_metrics)
        assert value(before, "modelpress_jobs_created_total", queue="cpu", methods="quantize") == 1
        assert total(before, "modelpress_queue_depth", queue="cpu") == 1
        assert value(before, "modelpress_queue_depth", queue="cpu", priority="4") == 1  # tenant priority 5
        assert value(before, "modelpress_jobs", status="queued") == 1
        assert value(before, "http_requests_total", handler="/v1/jobs", method="POST", status="2xx") == 1
        assert value(before, "modelpress_upload_bytes_total") == sum(map(len, model.values())) + len(
            sample_text(6).encode()
        )
        assert value(before, "modelpress_upload_verify_seconds_count", result="ok") == 2

        worker_port = free_port()
        (tmp_path / "prom-worker").mkdir()
        stack.start_worker(
            {"MODELPRESS_METRICS_PORT": str(worker_port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom-worker")}
        )
        done = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=480)
        assert done["status"] == "succeeded", done

    worker = scrape(f"http://127.0.0.1:{worker_port}/metrics")
    assert value(worker, "modelpress_jobs_started_total", queue="cpu", retry="false") == 1
    assert value(worker, "modelpress_job_queue_wait_seconds_count", queue="cpu", methods="quantize") == 1
    assert value(worker, "modelpress_job_step_seconds_count", method="quantize", status="succeeded") == 1
    assert total(worker, "modelpress_job_step_seconds_count") == 1
    finished = {"queue": "cpu", "methods": "quantize", "status": "succeeded", "error_type": ""}
    assert value(worker, "modelpress_jobs_finished_total", **finished) == 1
    assert total(worker, "modelpress_jobs_finished_total") == 1
    assert value(worker, "modelpress_job_run_seconds_count", methods="quantize", status="succeeded") == 1
    assert total(worker, "modelpress_job_retries_total") == 0
    assert total(worker, "modelpress_worker_peak_rss_bytes") > 50e6  # torch is loaded
    assert total(worker, "modelpress_worker_job_progress_ratio") == 1.0
    assert total(worker, "modelpress_jobs_created_total") == 0  # the API's counter, not the worker's

    def after() -> None:
        api = scrape(api_metrics)
        assert total(api, "modelpress_queue_depth", queue="cpu") == 0
        assert value(api, "modelpress_jobs", status="queued") == 0
        assert value(api, "modelpress_jobs", status="succeeded") == 1
        assert value(api, "modelpress_webhook_outbox_pending") == 0

    # Every event of the job reaches the receiver once (a retry would resend the same webhook-id).
    def delivered() -> dict:  # type: ignore[type-arg]
        assert "job.succeeded" in receiver.deliveries.values()
        metrics = scrape(f"http://127.0.0.1:{maintenance_port}/metrics")
        assert value(metrics, "modelpress_webhook_attempts_total", status_class="2xx", outcome="delivered") == len(
            receiver.deliveries
        )
        return metrics

    maintenance = eventually(delivered)
    eventually(after)
    receiver.shutdown()
    assert {"job.queued", "job.started", "job.succeeded"} <= set(receiver.deliveries.values())
    assert total(maintenance, "modelpress_webhook_attempts_total") == len(receiver.deliveries)
    assert value(maintenance, "modelpress_webhook_delivery_lag_seconds_count") == len(receiver.deliveries)

    # The job's life in the logs of the three processes, found by its id alone.
    api_lines = [line for line in json_lines(tmp_path / "api.log") if line.get("job_id") == job_id]
    worker_lines = [line for line in json_lines(tmp_path / "worker-0.log") if line.get("job_id") == job_id]
    maintenance_lines = [line for line in json_lines(tmp_path / "maintenance.log") if line.get("job_id") == job_id]
    submit = [line for line in api_lines if line.get("event") == "job.queued"]
    assert len(submit) == 1 and submit[0]["request_id"] == request_id and submit[0]["service"] == "api"
    assert submit[0]["tenant_id"].startswith("ten_")
    events = [line["event"] for line in worker_lines if "event" in line]
    assert events.count("job.started") == 1 and events[-1] == "job.succeeded", events
    assert {line["service"] for line in worker_lines} == {"worker"}
    # The POST's request id travelled with the Celery message into the worker's lines of that job.
    assert all(line.get("request_id") == request_id for line in worker_lines if line.get("event"))
    assert any(line.get("attempt") == 1 for line in worker_lines)
    assert any(line.get("step") == "0:quantize" for line in worker_lines)
    assert {line["service"] for line in maintenance_lines} == {"maintenance"}
    assert len([line for line in maintenance_lines if "delivery_id" in line]) == len(receiver.deliveries)
