"""Traces: off by default; with an OTLP endpoint, an API request exports its server span and SQL child spans."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers import Caller

ROOT = Path(__file__).resolve().parents[2]


def test_no_tracing_is_set_up_without_an_endpoint() -> None:
    """No tracer provider and no instrumentation package is loaded unless OTEL_EXPORTER_OTLP_ENDPOINT is set.
    (redis-py imports parts of the OpenTelemetry SDK by itself where it is installed; that sets nothing up.)"""
    code = (
        "import sys, app.main, workers.tasks; from opentelemetry import trace; "
        "print(type(trace.get_tracer_provider()).__name__, "
        "sorted(m for m in sys.modules if m.startswith('opentelemetry.instrumentation.')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "ProxyTracerProvider []"


def test_request_is_traced_to_an_otlp_collector(pg_stack: dict[str, str], alice: Caller) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[bytes] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = textwrap.dedent(f"""
        from fastapi.testclient import TestClient
        from opentelemetry import trace
        from app.main import create_app
        with TestClient(create_app()) as client:
            assert client.get("/v1/jobs", headers={{"Authorization": "Bearer {alice.key}"}}).status_code == 200
        trace.get_tracer_provider().force_flush()
    """)
    env = {**pg_stack, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    import os

    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    server.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    spans = []
    for body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            spans += [(service, s) for scope in resource.scope_spans for s in scope.spans]
    assert {service for service, _ in spans} == {"modelpress-api"}
    server_span = next(s for _, s in spans if s.name == "GET /v1/jobs")
    sql = [s for _, s in spans if any(a.key == "db.system" or a.key == "db.system.name" for a in s.attributes)]
    assert sql and all(s.trace_id == server_span.trace_id for s in sql), [
        (s.name, [a.key for a in s.attributes]) for _, s in spans
    ]
