"""Throughput of ``GET /v1/jobs/{id}`` (or the job list) next to a FastAPI hello-world, side by side on loopback.

Starts the real API (uvicorn, one process, Postgres + Redis configured as in production, the app built as
``modelpress serve`` builds it) and a hello-world
FastAPI app (uvicorn, one process), both with the same uvicorn options (``--http httptools --loop uvloop
--no-access-log``), then drives each with the same bounded load from ``wrk`` (``apt-get install wrk``):
N connections for D seconds after a short warm-up. The two are measured alternately, ``--rounds`` times
(hello, API, API, hello, …), so that a neighbour's load falls on both alike; every round is reported.

Besides requests/s and latency percentiles, each round reads from ``/proc`` the CPU time (user + system) that
the server process, ``wrk``, the Postgres backends connected to the benchmark database and the Redis server
spent, per request: on a shared machine wall-clock rates swing with other people's work, CPU per request
much less, and it shows where the cores go (Redis serves other clients too: its figure is an upper bound).

    python -m bench.api_throughput [--connections 32] [--duration 10] [--rounds 3] [--database-url …] [--redis-url …]

The job read is a real one: a tenant, a key (its request-rate quota raised so the limiter answers "allowed",
still one Redis round trip per request) and a queued job are created first, in a database of its own
(``bench_api`` by default, created when missing). Results are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

hello = FastAPI()


@hello.get("/hello")
async def hello_world() -> dict[str, str]:
    """The reference: FastAPI's own first example."""
    return {"message": "Hello World"}


@hello.get("/hello-sync")
def hello_world_sync() -> dict[str, str]:
    """The same as a plain ``def``: FastAPI runs it in its thread pool, one hop there and back (``--floor``)."""
    return {"message": "Hello World"}


@asynccontextmanager
async def _floor_lifespan(app: FastAPI) -> AsyncIterator[None]:
    import psycopg
    import redis.asyncio

    from app.auth.ratelimit import _LUA

    conninfo = os.environ["BENCH_FLOOR_CONNINFO"]
    connections: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(8):
        connections.put_nowait(await psycopg.AsyncConnection.connect(conninfo, autocommit=True))
    client = redis.asyncio.Redis.from_url(os.environ["MODELPRESS_BROKER_URL"])
    app.state.connections, app.state.limit = connections, client.register_script(_LUA)
    yield
    await client.aclose()
    while not connections.empty():
        await connections.get_nowait().close()


floor = FastAPI(lifespan=_floor_lifespan)


@floor.get("/jobs/{job_id}")
async def floor_read(job_id: str, request: Request) -> dict[str, Any]:
    """The least a rate-limited database read can cost on this stack (``--floor``): one Redis
    EVALSHA (the API's rate-limit script) and one prepared primary-key SELECT on a raw asyncio psycopg
    connection, no middleware, no key lookup, no ORM or SQLAlchemy, no response model."""
    state = request.app.state
    await state.limit(keys=["modelpress:ratelimit:bench-floor"], args=[60_000, 100_000_000])
    conn = await state.connections.get()
    try:
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute("SELECT * FROM jobs WHERE id = %s", (job_id,), prepare=True)
        row = await cursor.fetchone()
    finally:
        state.connections.put_nowait(conn)
    return {"id": row["id"], "status": row["status"], "spec": row["spec"]} if row else {}


# The API as ``modelpress serve`` runs it (a factory: the app with its garbage collector tuned for serving).
API_TARGET = "app.main:serving_app"
UVICORN_OPTIONS = ["--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, headers: dict[str, str], timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, headers=headers, timeout=5).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def _api_target(tree: Path) -> str:
    """How ``modelpress serve`` runs that tree's API: its serving factory, where the tree has one."""
    return API_TARGET if "def serving_app" in (tree / "app" / "main.py").read_text() else "app.main:app"


def _serve(target: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """uvicorn serving ``target`` from the tree on ``env``'s PYTHONPATH. It runs in that directory: ``python -m``
    puts the working directory first on ``sys.path``, ahead of PYTHONPATH, so started from this checkout a
    ``--baseline-tree`` server would import this checkout's code instead of the baseline's."""
    factory = ["--factory"] if target == API_TARGET else []  # a function that builds the app
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        *factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *UVICORN_OPTIONS,
    ]
    return subprocess.Popen(command, env=env, cwd=env["PYTHONPATH"].split(os.pathsep)[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def _pids_of(name: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(int(p.name)) == name]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _postgres_backends(database_url: str, database: str) -> list[int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database}
        ).scalars()
        found = list(pids)
    engine.dispose()
    return found


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(url: str, connections: int, duration_s: int, headers: dict[str, str]) -> tuple[dict[str, Any], float]:
    """One bounded wrk run (2 threads, ``connections`` connections, ``duration_s`` seconds): its numbers and
    the CPU seconds wrk itself used."""
    command = ["wrk", "-t2", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s", "--latency"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    before = os.times()
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=duration_s + 30).stdout
    after = os.times()
    wrk_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
    }, wrk_cpu


def measure(
    url: str,
    headers: dict[str, str],
    server_pid: int,
    others: Callable[[], dict[str, list[int]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Warm up, then one measured wrk run with the CPU each party spent per request (microseconds); ``others``
    names the other processes to account for, asked after the warm-up (the server's pool is open by then)."""
    run_wrk(url, args.connections, args.warmup, headers)
    pids = {"server": [server_pid], **others()}
    before = {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}
    result, wrk_cpu = run_wrk(url, args.connections, args.duration, headers)
    spent = {name: sum(cpu_seconds(pid) for pid in group) - before[name] for name, group in pids.items()}
    spent["wrk"] = wrk_cpu
    requests = max(result["requests"], 1)
    result["cpu_us_per_request"] = {name: round(seconds / requests * 1e6) for name, seconds in spent.items()}
    return result


def _ensure_database(url: str) -> str:
    from sqlalchemy import create_engine, text

    target = make_url(url)
    engine = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}).first():
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    engine.dispose()
    return str(target.database)


def _seed(env: dict[str, str]) -> tuple[str, str]:
    """Migrate, then create a tenant, a key and 20 queued jobs; returns (key, a job's id). Runs in a child
    process so this one never imports the app with the wrong settings."""
    code = """
import json
from app.cli import cmd_migrate
cmd_migrate(None)
from app.auth.service import create_key, create_tenant
from app.db import session_scope
from app.ids import new_id
from app.jobs.models import Job, JobMetadata
with session_scope() as s:
    tenant = create_tenant(s, new_id("bench"), rate_limit_per_minute=100_000_000)
    _, key = create_key(s, tenant.id, "bench")
    jobs = [
        Job(tenant_id=tenant.id, spec={"steps": [{"method": "quantize", "scheme": "w8a16"}]},
            steps=[{"index": 0, "method": "quantize", "status": "pending"}],
            metadata_items=[JobMetadata(key="team", value="search"), JobMetadata(key="run", value=str(i))])
        for i in range(20)  # a full default page for the list read
    ]
    s.add_all(jobs)
    s.flush()
    print(json.dumps([key, jobs[-1].id]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    key, job_id = json.loads(out.stdout.strip().splitlines()[-1])
    return key, job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs of each server, alternating")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench_api"),
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure two references between the hello-world and the API: the hello-world as a sync route "
        "(one thread-pool hop) and the floor of a rate-limited database read (see floor_read)",
    )
    parser.add_argument(
        "--read",
        choices=["job", "list"],
        default="job",
        help="the API read measured: one job (GET /v1/jobs/{id}) or the first page of the list (GET /v1/jobs, "
        "20 jobs with their metadata)",
    )
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the API process (repeatable)")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="a checkout of another revision (git archive REV | tar -x -C DIR): its API is measured too, as "
        "<read>_baseline, in the same alternation and against the same database",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    root = Path(__file__).resolve().parents[1]
    database = _ensure_database(args.database_url)
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
            **dict(item.split("=", 1) for item in args.env),
        }
        key, job_id = _seed(env)
        auth = {"Authorization": f"Bearer {key}"}
        read, read_path = ("get_job", f"/v1/jobs/{job_id}") if args.read == "job" else ("list_jobs", "/v1/jobs")
        servers: dict[str, tuple[subprocess.Popen[bytes], str, dict[str, str]]] = {}
        rounds: list[dict[str, Any]] = []
        try:
            port = _free_port()
            servers["hello_world"] = (
                _serve("bench.api_throughput:hello", port, env),
                f"http://127.0.0.1:{port}/hello",
                {},
            )
            port = _free_port()
            servers[read] = (_serve(_api_target(root), port, env), f"http://127.0.0.1:{port}{read_path}", auth)
            if args.floor:
                port = _free_port()
                url = f"http://127.0.0.1:{port}/hello-sync"
                servers["hello_sync"] = (_serve("bench.api_throughput:hello", port, env), url, {})
                port = _free_port()
                conninfo = make_url(args.database_url).set(drivername="postgresql").render_as_string(False)
                floor_env = {**env, "BENCH_FLOOR_CONNINFO": conninfo}
                url = f"http://127.0.0.1:{port}/jobs/{job_id}"
                servers["floor"] = (_serve("bench.api_throughput:floor", port, floor_env), url, {})
            if args.baseline_tree:
                port = _free_port()
                baseline_env = {**env, "PYTHONPATH": str(args.baseline_tree.resolve())}
                baseline = _serve(_api_target(args.baseline_tree), port, baseline_env)
                servers[f"{read}_baseline"] = (baseline, f"http://127.0.0.1:{port}{read_path}", auth)
            for _, url, headers in servers.values():
                _wait_http(url, headers)
            redis_pids = _pids_of("redis-server")

            def others(name: str) -> Callable[[], dict[str, list[int]]]:
                if name.startswith("hello"):
                    return lambda: {"redis": redis_pids}
                return lambda: {"redis": redis_pids, "postgres": _postgres_backends(args.database_url, database)}

            names = list(servers)
            for index in range(args.rounds):
                order = names if index % 2 == 0 else names[::-1]
                row: dict[str, Any] = {"round": index + 1, "uptime": _uptime()}
                for name in order:
                    server, url, headers = servers[name]
                    row[name] = measure(url, headers, server.pid, others(name), args)
                for name in names[1:]:
                    row[f"ratio_{name}"] = round(row[name]["requests_per_s"] / row["hello_world"]["requests_per_s"], 3)
                rounds.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for server, _, _ in servers.values():
                server.terminate()
                server.wait(timeout=10)
    summary = {
        "rounds": rounds,
        **{
            f"median_{key}": sorted(r[key] for r in rounds)[len(rounds) // 2]
            for key in rounds[0]
            if key.startswith("ratio_")
        },
        "load": {
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "tool": "wrk -t2",
        },
        "uvicorn": UVICORN_OPTIONS,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "uptime_after": _uptime(),
    }
    print(json.dumps(summary, indent=2))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
