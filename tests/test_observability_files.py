"""The observability deployment files: Prometheus config and rules, Grafana provisioning, the compose profile.

``promtool`` (Debian: ``apt-get install prometheus``) and ``docker-compose`` check them for real when they
are installed; the structural checks run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OBSERVABILITY = {"prometheus", "grafana", "flower"}


def test_alert_rules_cover_the_on_call_questions() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    exprs = {r["alert"]: r["expr"] for group in rules["groups"] for r in group["rules"]}
    assert "modelpress_job_queue_wait_seconds_bucket" in exprs["ModelPressQueueWaitP99High"]
    assert 'status="failed"' in exprs["ModelPressJobFailureRatioHigh"]
    assert "modelpress_webhook_outbox_oldest_pending_age_seconds" in exprs["ModelPressWebhookBacklogOld"]
    assert "modelpress_worker_heartbeat_age_seconds" in exprs["ModelPressWorkerHeartbeatStale"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_rules_and_config(tmp_path: Path) -> None:
    rules = DEPLOY / "prometheus" / "rules.yml"
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # The config names the rules file by its path inside the container: point it at the repository's copy.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(rules)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_scrapes_every_process() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["modelpress-api"]["dns_sd_configs"][0]["names"] == ["api"]
    assert jobs["modelpress-api"]["dns_sd_configs"][0]["port"] == 8000
    assert set(jobs["modelpress-worker"]["dns_sd_configs"][0]["names"]) == {"worker", "worker-gpu"}
    assert jobs["modelpress-maintenance"]["static_configs"][0]["targets"] == ["maintenance:9100"]


def test_compose_observability_profile() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= OBSERVABILITY
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"], name
        for volume in services[name].get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    # Every other service runs without the profile, and the job processes serve their metrics.
    assert not any("observability" in s.get("profiles", []) for n, s in services.items() if n not in OBSERVABILITY)
    for name in ("worker", "worker-gpu", "maintenance"):
        env = services[name]["environment"]
        assert env["MODELPRESS_METRICS_PORT"] == "9100" and env["MODELPRESS_METRICS_BIND"] == "0.0.0.0", name
    assert services["api"]["environment"]["MODELPRESS_LOG_FORMAT"] == "json"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_is_valid(tmp_path: Path) -> None:
    # Debian's docker-compose (1.29) predates the top-level `name:` key of the Compose Specification.
    text = "\n".join(
        line for line in (ROOT / "docker-compose.yml").read_text().splitlines() if not line.startswith("name:")
    )
    (tmp_path / "compose.yml").write_text(text)
    env = {**os.environ, "MODELPRESS_SIGNING_SECRET": "s", "MODELPRESS_ENCRYPTION_KEYS": "k"}
    argv = ["docker-compose", "--project-directory", str(ROOT), "-f", str(tmp_path / "compose.yml")]
    out = subprocess.run([*argv, "--profile", "observability", "config"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert set(yaml.safe_load(out.stdout)["services"]) >= OBSERVABILITY


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "modelpress.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = sources["datasources"][0]["uid"]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "modelpress.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "ModelPress"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
