"""From a model folder to a compressed, verified model, one call each: the SDK on Postgres + Redis + S3, the
CLI on the embedded stack; downloads with a corrupted byte or a cut body, through the fault proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelpress import IntegrityError, ModelPress
from tests.helpers import ROOT, Stack, assert_same_outputs
from tests.sdk.proxy import FaultProxy, Rule
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
QUANTIZE = [{"method": "quantize", "scheme": "w8a16", "algorithm": "rtn"}]


def test_sdk_from_folder_to_verified_model_on_postgres_redis_s3(production_stack: Stack, tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "tiny")
    (tmp_path / "eval.txt").write_text(sample_text(6))
    production_stack.start_worker()
    with ModelPress(api_key=production_stack.key, base_url=production_stack.base_url) as mp:
        job = mp.jobs.create(
            model=model_dir,
            steps=QUANTIZE,
            evaluation=tmp_path / "eval.txt",
            evaluation_options={"seq_len": 64},
            metadata={"suite": "sdk"},
        )
        job.wait(timeout=400, check=True)
        files = job.download(tmp_path / "out")
    assert job.status == "succeeded" and job.summary is not None and job.summary["size_ratio"] < 0.75
    assert {"model/config.json", "model/model.safetensors", "report.json", "manifest.json"} <= {
        p.relative_to(tmp_path / "out").as_posix() for p in files
    }
    assert_same_outputs(model_dir, tmp_path / "out" / "model")


def test_cli_run_and_downloads_that_break_on_the_embedded_stack(
    proxied_stack: Stack, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_dir = write_model_dir(tmp_path / "tiny")
    (tmp_path / "eval.txt").write_text(sample_text(6))
    (tmp_path / "recipe.json").write_text(json.dumps({"steps": QUANTIZE, "evaluation": {"seq_len": 64}}))
    proxied_stack.start_worker()
    env = {**os.environ, "MODELPRESS_BASE_URL": proxy.url, "MODELPRESS_API_KEY": proxied_stack.key}
    run = subprocess.run(
        [sys.executable, "-m", "modelpress", "run", str(model_dir), "--recipe", str(tmp_path / "recipe.json"),
         "--eval", str(tmp_path / "eval.txt"), "--out", str(tmp_path / "out"), "--metadata", "suite=cli", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    job_id = result["job"]["id"]
    assert result["job"]["status"] == "succeeded" and result["job"]["metadata"] == {"suite": "cli"}
    assert str(tmp_path / "out" / "model" / "model.safetensors") in result["files"]
    assert_same_outputs(model_dir, tmp_path / "out" / "model")

    with ModelPress(api_key=proxied_stack.key, base_url=proxy.url, backoff_s=0.05) as mp:
        # One flipped byte in one file: an error, and nothing at the destination.
        proxy.add(Rule("GET", "/v1/storage/", "corrupt_body", nth=2, value=3))
        with pytest.raises(IntegrityError):
            mp.jobs.download(job_id, tmp_path / "corrupted")
        assert not (tmp_path / "corrupted").exists()

        # A body cut after 5 bytes: the download resumes from byte 5 with an HTTP Range.
        proxy.add(Rule("GET", "/v1/storage/", "cut_body_after", value=5))
        files = mp.jobs.download(job_id, tmp_path / "again")
    assert any(r.headers.get("range") == "bytes=5-" for r in proxy.requests("GET", "/v1/storage/"))
    for path in files:
        relative = path.relative_to(tmp_path / "again")
        assert path.read_bytes() == (tmp_path / "out" / relative).read_bytes(), relative
