"""The ``modelpress`` command: serve, worker, maintenance, migrate, dev, compress, admin.

The API side never imports torch; ``worker`` and ``compress`` load the workers package, which does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

DEV_KEY = "mp_dev_insecure_local_key"


def _port() -> int:
    return int(os.environ.get("PORT", "8000"))


def cmd_migrate(_args: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    from app.config import get_settings

    settings = get_settings()
    if settings.resolved_database_url().startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = Config(str(Path(__file__).resolve().parent.parent / "alembic.ini"))
    command.upgrade(config, "head")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "app.main:serving_app",
        factory=True,
        host=args.host,
        port=args.port or _port(),
        proxy_headers=True,
        log_level="info",
    )
    return 0


def _celery_worker_argv(queues: str, concurrency: int, hostname: str | None, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--queues", queues, "--loglevel", "INFO", "--concurrency", str(concurrency),
        "--hostname", hostname or f"modelpress-{queues.replace(',', '-')}@%h",
        # No gossip or mingle: nothing here uses them (workers are told nothing by each other), and gossip's
        # restart after a lost Redis connection can kill the worker (kombu#582, seen in tests/fault).
        "--without-gossip", "--without-mingle", *extra,
    ]  # fmt: skip


def worker_argv(queues: str, concurrency: int = 1, *, hostname: str | None = None) -> list[str]:
    """A job worker's command line (also used by the end-to-end tests to start real workers)."""
    return _celery_worker_argv(queues, concurrency, hostname)


def maintenance_argv(*, hostname: str | None = None, schedule: Path | None = None) -> list[str]:
    """The maintenance worker's command line: the beat schedule (reaper, webhook relay, delivery
    pruning, upload expiry) and a two-thread worker on the ``maintenance`` queue that runs it. Threads, not
    processes: the tasks are short and mostly wait on the database and the network, and the reaper
    never waits behind a slow webhook round. Run exactly one per deployment (one beat)."""
    from app.broker import MAINTENANCE_QUEUE

    if schedule is None:
        data_dir = Path(os.environ.get("MODELPRESS_DATA_DIR", "var"))
        data_dir.mkdir(parents=True, exist_ok=True)
        schedule = data_dir / "celerybeat-schedule"
    return _celery_worker_argv(
        MAINTENANCE_QUEUE, 2, hostname, "--pool", "threads", "--beat", "--schedule", str(schedule)
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from app.observability.celery import prepare_metrics_dir

    if "gpu" in {queue.strip() for queue in args.queues.split(",")}:
        from workers.compression.device import cuda_problem  # torch: the worker side only

        problem = cuda_problem()
        if problem is not None:
            print(
                f"modelpress worker: the gpu queue needs CUDA, and {problem}. Serve the cpu queue instead "
                "(--queues cpu).",
                file=sys.stderr,
            )
            return 2
    prepare_metrics_dir()
    os.execv(sys.executable, worker_argv(args.queues, args.concurrency))
    return 0  # not reached


def cmd_maintenance(_args: argparse.Namespace) -> int:
    from app.observability.celery import prepare_metrics_dir

    prepare_metrics_dir()
    os.execv(sys.executable, maintenance_argv())
    return 0  # not reached


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded mode: migrate, then run a job worker, the maintenance worker and the API, no servers needed.

    The workers are supervised: one that dies is restarted (with back-off and a log line), and all of them
    stop when the API does (Ctrl-C or SIGTERM)."""
    from app.config import get_settings
    from app.observability.logs import configure_logging
    from app.supervisor import Supervisor

    os.environ.setdefault("MODELPRESS_BOOTSTRAP_API_KEY", DEV_KEY)
    port = args.port or _port()
    os.environ.setdefault("MODELPRESS_PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
    configure_logging(get_settings(), "dev")
    cmd_migrate(args)
    supervisor = Supervisor({"worker": worker_argv("cpu,gpu"), "maintenance": maintenance_argv()})
    # SIGTERM ends up here as an exception, like Ctrl-C's KeyboardInterrupt, so the children are stopped
    # whenever it arrives: uvicorn handles it while serving and then raises it again once it has shut down.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        supervisor.start()
        print(f"\n  ModelPress (embedded mode) on http://127.0.0.1:{port}  — docs at /docs, console at /console")
        print(f"  API key: {os.environ['MODELPRESS_BOOTSTRAP_API_KEY']}\n", flush=True)
        cmd_serve(argparse.Namespace(host=args.host, port=port))
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def cmd_compress(args: argparse.Namespace) -> int:
    """Run a recipe on a local model directory with the very engines the service uses."""
    from workers.local import compress_local

    report = compress_local(
        Path(args.model_dir),
        Path(args.recipe),
        Path(args.out),
        calibration=Path(args.calibration) if args.calibration else None,
        evaluation=Path(args.eval) if args.eval else None,
        training=Path(args.train) if args.train else None,
        measure_speed=not args.no_speed,
        low_memory=args.low_memory,
    )
    print(report.summary.model_dump_json(indent=2))
    print(f"wrote {args.out}/model, report.json, report.png, README.md")
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    from app.auth import service
    from app.db import session_scope

    with session_scope() as session:
        if args.admin_command == "create-tenant":
            tenant = service.create_tenant(session, args.name)
            print(json.dumps({"id": tenant.id, "name": tenant.name}))
        elif args.admin_command == "create-key":
            key, clear = service.create_key(session, args.tenant, args.name, args.scopes.split(","))
            print(json.dumps({"id": key.id, "key": clear, "scopes": key.scopes}))
            print("store this key now: it is not shown again", file=sys.stderr)
        elif args.admin_command == "rotate-encryption-key":
            from app.webhooks.service import reencrypt_secrets

            print(json.dumps({"reencrypted_endpoints": reencrypt_secrets(session)}))
        elif args.admin_command == "revoke-key":
            if not service.revoke_key(session, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
            print(json.dumps({"id": args.key_id, "revoked": True}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a job worker (Celery)")
    p.add_argument("--queues", default="cpu", help="comma-separated: cpu, gpu")
    p.add_argument("--concurrency", type=int, default=1)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "maintenance",
        help="run the periodic tasks (lease reaper, webhook relay, delivery pruning, upload expiry); run one",
    )
    p.set_defaults(func=cmd_maintenance)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("dev", help="embedded mode: migrate, API and a worker, no external servers")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("compress", help="compress a local model directory with a recipe")
    p.add_argument("model_dir")
    p.add_argument("--recipe", required=True, help='JSON: {"steps": [...], "calibration": {...}}')
    p.add_argument("--out", required=True)
    p.add_argument("--calibration", help="calibration text file (.txt or .jsonl)")
    p.add_argument("--eval", help="evaluation text file")
    p.add_argument("--train", help="training text file (distillation)")
    p.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize layer by layer from the shards, never loading the whole model "
        "(default: the recipe's low_memory, else automatic when the model would not fit in memory)",
    )
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("admin", help="tenants, API keys, encryption keys")
    admin = p.add_subparsers(dest="admin_command", required=True)
    a = admin.add_parser("create-tenant")
    a.add_argument("name")
    a = admin.add_parser("create-key")
    a.add_argument("tenant", help="tenant id")
    a.add_argument("--name", default="default")
    a.add_argument("--scopes", default="jobs:read,jobs:write,webhooks:manage")
    a = admin.add_parser("revoke-key")
    a.add_argument("key_id")
    admin.add_parser(
        "rotate-encryption-key",
        help="re-encrypt stored webhook secrets under the first of MODELPRESS_ENCRYPTION_KEYS",
    )
    p.set_defaults(func=cmd_admin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
