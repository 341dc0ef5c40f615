"""The API's /metrics, request ids, and the dashboard's queries against what the processes really export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Caller

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "modelpress.json"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "summary": ("_count", "_sum"),
}


def exported_series(text: str) -> set[str]:
    """Every series name a /metrics page can hold, labelled children or not (worker metrics have none here)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_metrics_needs_no_tenant_key_and_counts_requests(client: TestClient, alice: Caller) -> None:
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(page.text)
        for s in f.samples
    }
    listed = ("http_requests_total", frozenset({("handler", "/v1/jobs"), ("method", "GET"), ("status", "2xx")}))
    assert samples[listed] >= 1
    assert samples[("modelpress_jobs", frozenset({("status", "queued")}))] == 0
    assert samples[("modelpress_scrape_source_up", frozenset({("source", "database")}))] == 1
    assert samples[("modelpress_scrape_source_up", frozenset({("source", "broker")}))] == 1


def test_metrics_token_guards_the_page(pg_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("MODELPRESS_METRICS_TOKEN", "scrape-secret")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            refused = client.get("/metrics")
            assert refused.status_code == 401
            assert refused.headers["content-type"] == "application/problem+json"
            assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200
    finally:
        get_settings.cache_clear()


def test_request_id_is_kept_or_made_and_returned(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.42"}).headers["x-request-id"] == "lb-7f3a.42"
    made = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    # An id that would spoil a log line is replaced.
    assert client.get("/healthz", headers={"X-Request-ID": "a b;c"}).headers["x-request-id"] != "a b;c"
    assert client.get("/healthz", headers={"X-Request-ID": "x" * 129}).headers["x-request-id"] != "x" * 129


def test_every_dashboard_and_alert_query_names_an_exported_metric(client: TestClient) -> None:
    exported = exported_series(client.get("/metrics").text) | {"up"}
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    queries.append(RULES.read_text())
    referenced = {name for q in queries for name in re.findall(r"\b((?:modelpress|http)_[a-z0-9_]+)\b", q)}
    assert len(referenced) > 20
    assert referenced <= exported, sorted(referenced - exported)
