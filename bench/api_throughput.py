"""Throughput of ``GET /v1/jobs/{id}`` next to a FastAPI hello-world, side by side on loopback.

Starts the real API (uvicorn, one process, Postgres + Redis configured as in production) and a
hello-world FastAPI app (uvicorn, one process), then drives each with the same bounded load from
``wrk`` (``apt-get install wrk``): N connections for D seconds after a short warm-up, one after the
other. Reports requests/s, p50 and p99 latency, and the API's share of the hello-world's rate.

    python -m bench.api_throughput [--connections 32] [--duration 10] [--database-url …] [--redis-url …]

Defaults use the test servers on 127.0.0.1 (``BENCH_DATABASE_URL``, ``BENCH_REDIS_URL``). The job read is
a real one: a tenant, a key (its request-rate quota raised so the limiter answers "allowed", still
one Redis round trip per request) and a queued job are created first. Results are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

hello = FastAPI()


@hello.get("/hello")
async def hello_world() -> dict[str, str]:
    """The reference: FastAPI's own first example."""
    return {"message": "Hello World"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def _serve(target: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(command, env=env)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(url: str, connections: int, duration_s: int, headers: dict[str, str]) -> dict[str, Any]:
    """One bounded wrk run (2 threads, ``connections`` connections, ``duration_s`` seconds)."""
    command = ["wrk", "-t2", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s", "--latency"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=duration_s + 30).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
    }


def _seed(env: dict[str, str]) -> tuple[str, str]:
    """Migrate, then create a tenant, a key and a queued job; returns (key, job id). Runs in a child
    process so this one never imports the app with the wrong settings."""
    code = """
import json
from app.cli import cmd_migrate
cmd_migrate(None)
from app.auth.models import Tenant
from app.auth.service import create_key, create_tenant
from app.db import session_scope
from app.ids import new_id
from app.jobs.models import Job
with session_scope() as s:
    tenant = create_tenant(s, new_id("bench"), rate_limit_per_minute=100_000_000)
    _, key = create_key(s, tenant.id, "bench")
    job = Job(tenant_id=tenant.id, spec={"steps": [{"method": "quantize", "scheme": "w8a16"}]},
              steps=[{"index": 0, "method": "quantize", "status": "pending"}])
    s.add(job)
    s.flush()
    print(json.dumps([key, job.id]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    key, job_id = json.loads(out.stdout.strip().splitlines()[-1])
    return key, job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test_shape"),
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "MODELPRESS_ENVIRONMENT": "production",
            "MODELPRESS_DATA_DIR": data_dir,
            "MODELPRESS_DATABASE_URL": args.database_url,
            "MODELPRESS_BROKER_URL": args.redis_url,
            "MODELPRESS_SIGNING_SECRET": "bench-signing-secret",
            "MODELPRESS_ENCRYPTION_KEYS": "ZmRlYWRiZWVmZGVhZGJlZWZkZWFkYmVlZmRlYWRiZWU=",
        }
        key, job_id = _seed(env)
        api_port, hello_port = _free_port(), _free_port()
        servers = [_serve("app.main:app", api_port, env), _serve("bench.api_throughput:hello", hello_port, env)]
        try:
            _wait_http(f"http://127.0.0.1:{api_port}/healthz")
            _wait_http(f"http://127.0.0.1:{hello_port}/hello")
            targets = {
                "hello_world": (f"http://127.0.0.1:{hello_port}/hello", {}),
                "get_job": (f"http://127.0.0.1:{api_port}/v1/jobs/{job_id}", {"Authorization": f"Bearer {key}"}),
            }
            results: dict[str, Any] = {}
            for name, (url, headers) in targets.items():
                run_wrk(url, args.connections, args.warmup, headers)
                results[name] = run_wrk(url, args.connections, args.duration, headers)
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=10)
    results["ratio"] = round(results["get_job"]["requests_per_s"] / results["hello_world"]["requests_per_s"], 3)
    results["load"] = {"connections": args.connections, "duration_s": args.duration, "tool": "wrk -t2"}
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
