"""``bench/gpu_check.sh --dry-run``: the GPU check runs end to end on the CPU with tiny sizes, so that the
script a GPU machine runs cannot rot between the (rare) sessions that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gpu_check_runs_end_to_end_in_its_dry_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_CHECK_SITE": str(tmp_path / "site")}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=880, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["ok"] is True and results["mode"].startswith("dry-run")
    assert not (tmp_path / "site").exists()  # this interpreter has every package: nothing installed

    tests = results["cuda_tests"]
    assert tests["returncode"] == 0 and not tests["counts"].get("failed")
    if not torch.cuda.is_available():  # counted, each with its reason
        assert tests["counts"] == {"skipped": tests["counts"]["skipped"]} and tests["counts"]["skipped"] >= 6

    comparison = results["device_vs_cpu"]
    for engine in ("gptq_w4a16", "sparsegpt_50"):
        row = comparison[engine]
        assert row["equal_within_tolerance"] and row["device_seconds"] > 0 and row["cpu_seconds"] > 0
        # Quantization and pruning changed the model: the comparison is not of two untouched copies.
        assert row["cpu_perplexity"] != comparison["baseline_perplexity"]["cpu"]

    big = results["larger_than_device"]
    assert big["model_bytes"] > big["cap_bytes"]
    assert big["resident"]["spill"] is False and big["resident"]["expected_peak_bytes"] <= big["cap_bytes"]
    assert big["spilled"]["spill"] is True
    assert big["spilled"]["expected_peak_bytes"] < big["resident"]["expected_peak_bytes"]
    assert big["spilled_equals_resident"] is True
    assert "skipped" in results["vllm"] and "skipped" in results["ddp"]

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| gptq_w4a16 |" in markdown and "| spilled |" in markdown and "All checks passed: yes." in markdown
    assert markdown in done.stdout
