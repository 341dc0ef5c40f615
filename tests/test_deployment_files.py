"""docker-compose.yml and Dockerfile cannot run here (no Docker engine): check their structure instead."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_wires_the_full_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "worker-gpu", "maintenance"} <= set(
        services
    )
    for name in ("api", "worker", "worker-gpu", "migrate", "maintenance"):
        env = services[name]["environment"]
        assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["MODELPRESS_BROKER_URL"].startswith("redis://"), name
        assert env["MODELPRESS_STORAGE_BACKEND"] == "s3", name
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    assert services["worker-gpu"]["build"]["target"] == "worker-gpu"
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    assert "mc mb" in services["minio-init"]["command"][0]
    # One beat, in the maintenance service; job workers only take jobs.
    assert services["maintenance"]["command"] == ["modelpress", "maintenance"]
    assert not any("--beat" in services[name]["command"] for name in ("worker", "worker-gpu"))
    # The routing decision is the API's: the GPU switch must reach it, not only the GPU worker.
    assert "MODELPRESS_GPU_QUEUE" in services["api"]["environment"]


def test_dockerfile_api_image_has_no_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = {line.split()[-1]: i for i, line in enumerate(text.splitlines()) if line.startswith("FROM ")}
    assert {"base", "api", "worker"} <= set(stages)
    api_stage = text.split("FROM base AS api", 1)[1].split("FROM base AS worker", 1)[0]
    assert "pip install .\n" in api_stage and "[worker]" not in api_stage
    assert 'RUN sh deploy/install-worker.sh "$TORCH_INDEX"' in text.split("FROM base AS worker", 1)[1]
    assert 'pip install ".[worker,gguf]"' in (ROOT / "deploy/install-worker.sh").read_text()


def test_dockerfile_gpu_worker_has_the_cuda_build_of_the_pinned_torch() -> None:
    import re

    text = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"torch==([^"]+)"', pyproject)
    assert pinned is not None
    install = (ROOT / "deploy/install-worker.sh").read_text()
    assert f'pip install --index-url "$torch_index" "torch=={pinned.group(1)}"' in install
    cpu = text.split("FROM base AS worker\n", 1)[1].split("FROM base AS worker-gpu", 1)[0]
    gpu = text.split("FROM base AS worker-gpu", 1)[1]
    for stage, index in ((cpu, "whl/cpu"), (gpu, "whl/cu12")):
        assert f"ARG TORCH_INDEX=https://download.pytorch.org/{index}" in stage
        assert 'COPY deploy/install-worker.sh ./deploy/\nRUN sh deploy/install-worker.sh "$TORCH_INDEX"' in stage
    assert 'CMD ["modelpress", "worker", "--queues", "gpu"]' in gpu


def test_api_process_never_loads_torch() -> None:
    import subprocess
    import sys

    # The maintenance worker runs from the API image too: its tasks must not need torch either.
    code = (
        "import sys, app.main, app.cli, workers.tasks, workers.reaper, app.webhooks.relay; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
