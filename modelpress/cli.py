"""The ``modelpress`` command. Client verbs talk to a ModelPress API (no torch needed):

    modelpress run ./my-model --recipe recipe.json --calibration calib.txt --out ./out
    modelpress jobs list|get|cancel|events|wait|download …
    modelpress uploads create|get|parts …
    modelpress webhooks list|create|get|update|delete|rotate-secret|deliveries|redeliver …
    modelpress keys list|create|revoke …   ·   modelpress limits

Server verbs (serve, worker, maintenance, migrate, dev, compress, admin) are handed to ``app.cli``, imported
only then. The API key comes from ``$MODELPRESS_API_KEY`` or ``--api-key-file FILE`` (``-``: stdin), never
from a flag that would land in the shell history. ``--json`` prints machine-readable output.

Exit codes: 0 done · 1 the job failed or was cancelled · 2 usage error · 3 the API answered an error ·
4 the API could not be reached · 5 a download did not match its sha256 · 6 an upload was interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

SERVER_VERBS = frozenset({"serve", "worker", "maintenance", "migrate", "dev", "compress", "admin"})
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_API, EXIT_CONNECTION, EXIT_INTEGRITY, EXIT_UPLOAD = 0, 1, 2, 3, 4, 5, 6


class UsageError(Exception):
    """Bad arguments or input files (exit code 2)."""


def _client(args: argparse.Namespace) -> Any:
    from modelpress import ModelPress

    key: str | None
    if args.api_key_file:
        if args.api_key_file == "-":
            key = sys.stdin.readline().strip()
        else:
            with open(args.api_key_file, encoding="utf-8") as handle:
                key = handle.read().strip()
    else:
        key = os.environ.get("MODELPRESS_API_KEY")
    if not key:
        raise UsageError("no API key: set MODELPRESS_API_KEY or pass --api-key-file FILE (- for stdin)")
    return ModelPress(api_key=key, base_url=args.base_url)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _emit(args: argparse.Namespace, value: Any, text: Callable[[Any], str] | None = None) -> None:
    if args.json or text is None:
        print(json.dumps(_plain(value), indent=None if args.json else 2))
    else:
        print(text(value))


def _metadata(items: Sequence[str] | None) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _job_line(job: Any) -> str:
    error = f"  {job.error.type}: {job.error.message}" if job.error else ""
    return f"{job.id}  {job.status:<10}  {job.progress.fraction:>4.0%}  {job.created_at:%Y-%m-%d %H:%M}{error}"


def _summary_table(job: Any) -> str:
    lines = [f"job {job.id}: {job.status}"]
    if job.error:
        lines.append(f"error: {job.error.type}: {job.error.message}")
    for key, value in (job.summary or {}).items():
        if not isinstance(value, dict | list):
            lines.append(f"  {key:<28} {value}")
    return "\n".join(lines)


def _exit_for(job: Any) -> int:
    return EXIT_OK if job.status == "succeeded" else EXIT_JOB_FAILED


# ---------------------------------------------------------------- verbs


def cmd_run(args: argparse.Namespace) -> int:
    """Upload the model (and texts), submit the recipe, follow the job, download and verify the result."""
    try:
        with open(args.recipe, encoding="utf-8") as handle:
            recipe = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--recipe {args.recipe}: {exc}") from exc
    if not isinstance(recipe, dict) or not recipe.get("steps"):
        raise UsageError('--recipe must be a JSON object with "steps": [...]')
    if recipe.get("calibration") and not args.calibration:
        raise UsageError("the recipe has calibration options: pass --calibration FILE")
    progress = (not args.json and sys.stderr.isatty()) or args.progress
    with _client(args) as mp:
        job = mp.jobs.create(
            model=args.model,
            steps=recipe["steps"],
            calibration=args.calibration,
            evaluation=args.eval,
            training=args.train,
            calibration_options=recipe.get("calibration"),
            evaluation_options=recipe.get("evaluation"),
            low_memory=recipe.get("low_memory"),
            metadata=_metadata(args.metadata),
            hardware=args.hardware,
            progress=progress,
        )
        print(f"job {job.id} submitted", file=sys.stderr)
        if args.no_wait:
            _emit(args, job, lambda j: j.id)
            return EXIT_OK
        job.wait(progress=progress)
        files = []
        if job.status == "succeeded" and args.out:
            files = [str(p) for p in job.download(args.out, progress=progress)]
        if args.json:
            _emit(args, {"job": _plain(job), "files": files})
        else:
            print(_summary_table(job))
            if files:
                print(f"wrote {len(files)} files to {args.out} (sha256 verified)")
        return _exit_for(job)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        verb = args.jobs_command
        if verb == "list":
            page = mp.jobs.list(status=args.status, metadata=_metadata(args.metadata), limit=min(args.limit, 100))
            jobs = []
            for job in page:
                jobs.append(job)
                if len(jobs) >= args.limit:
                    break
            _emit(args, jobs, lambda js: "\n".join(_job_line(j) for j in js) or "no jobs")
        elif verb == "get":
            _emit(args, mp.jobs.get(args.job_id), None)
        elif verb == "cancel":
            _emit(args, mp.jobs.cancel(args.job_id), _job_line)
        elif verb == "events":
            source = (
                mp.jobs.stream(args.job_id, after=args.after)
                if args.follow
                else mp.jobs.events(args.job_id, after=args.after)
            )
            for event in source:
                if args.json:
                    print(event.model_dump_json(), flush=True)
                else:
                    print(
                        f"{event.id:>6}  {event.created_at:%H:%M:%S}  {event.type:<14}  {json.dumps(event.data)}",
                        flush=True,
                    )
        elif verb == "wait":
            job = mp.jobs.wait(args.job_id, progress=not args.json and sys.stderr.isatty())
            _emit(args, job, _summary_table)
            return _exit_for(job)
        elif verb == "download":
            files = mp.jobs.download(args.job_id, args.out, progress=not args.json and sys.stderr.isatty())
            _emit(args, [str(f) for f in files], lambda fs: f"wrote {len(fs)} files to {args.out} (sha256 verified)")
    return EXIT_OK


def cmd_uploads(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        if args.uploads_command == "create":
            upload = mp.uploads.upload(
                args.path,
                upload_id=args.resume,
                progress=not args.json and sys.stderr.isatty(),
                concurrency=args.concurrency,
            )
            _emit(args, upload, lambda u: f"{u.id}  {u.status}  {len(u.files)} files, {u.total_bytes} bytes")
        elif args.uploads_command == "get":
            _emit(args, mp.uploads.get(args.upload_id), None)
        elif args.uploads_command == "parts":
            _emit(args, mp.uploads.parts(args.upload_id), None)
    return EXIT_OK


def cmd_webhooks(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        verb = args.webhooks_command
        hooks = mp.webhooks
        if verb == "list":
            _emit(
                args,
                list(hooks.list()),
                lambda es: "\n".join(f"{e.id}  {'on ' if e.enabled else 'off'}  {e.url}" for e in es) or "no endpoints",
            )
        elif verb == "create":
            created = hooks.create(
                args.url, events=args.events.split(",") if args.events else None, description=args.description
            )
            _emit(args, created, None)
            print("store the secret now: it is not shown again", file=sys.stderr)
        elif verb == "get":
            _emit(args, hooks.get(args.endpoint_id), None)
        elif verb == "update":
            enabled = {"on": True, "off": False}.get(args.enabled or "")
            events = args.events.split(",") if args.events else None
            _emit(
                args,
                hooks.update(
                    args.endpoint_id, url=args.url, events=events, description=args.description, enabled=enabled
                ),
                None,
            )
        elif verb == "delete":
            hooks.delete(args.endpoint_id)
            _emit(args, {"id": args.endpoint_id, "deleted": True}, lambda _: f"deleted {args.endpoint_id}")
        elif verb == "rotate-secret":
            _emit(args, hooks.rotate_secret(args.endpoint_id, overlap_s=args.overlap_s), None)
            print("store the secret now: it is not shown again", file=sys.stderr)
        elif verb == "deliveries":
            items = list(hooks.deliveries(args.endpoint_id, status=args.status))
            _emit(
                args,
                items,
                lambda ds: (
                    "\n".join(
                        f"{d.id}  {d.status:<9}  {d.event_type:<14}  attempts {d.attempt_count}  "
                        f"last {d.last_status_code}"
                        for d in ds
                    )
                    or "no deliveries"
                ),
            )
        elif verb == "redeliver":
            _emit(args, hooks.redeliver(args.endpoint_id, args.delivery_id), None)
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        if args.keys_command == "list":
            _emit(
                args,
                mp.keys.list(include_revoked=args.include_revoked),
                lambda ks: "\n".join(
                    f"{k.id}  {k.prefix}…  {','.join(k.scopes)}  {'revoked' if k.revoked_at else ''}" for k in ks
                ),
            )
        elif args.keys_command == "create":
            _emit(args, mp.keys.create(name=args.name, scopes=args.scopes.split(",") if args.scopes else None), None)
            print("store this key now: it is not shown again", file=sys.stderr)
        elif args.keys_command == "revoke":
            mp.keys.revoke(args.key_id)
            _emit(args, {"id": args.key_id, "revoked": True}, lambda _: f"revoked {args.key_id}")
    return EXIT_OK


def cmd_limits(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        _emit(args, mp.limits.get(), None)
    return EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--base-url", default=None, help="API base URL (default: $MODELPRESS_BASE_URL or http://127.0.0.1:8000)"
    )
    common.add_argument(
        "--api-key-file", default=None, help="read the API key from FILE ('-': stdin) instead of $MODELPRESS_API_KEY"
    )

    parser = argparse.ArgumentParser(
        prog="modelpress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in sorted(SERVER_VERBS):
        sub.add_parser(verb, help=f"server: {verb} (see `modelpress {verb} --help`)", add_help=False)

    p = sub.add_parser("run", parents=[common], help="upload a model, run a recipe on the service, download the result")
    p.add_argument("model", help="model folder (or an s3:// URI or upload id)")
    p.add_argument("--recipe", required=True, help='JSON: {"steps": [...], "calibration": {...}, "evaluation": {...}}')
    p.add_argument("--calibration", help="calibration text file (.txt or .jsonl)")
    p.add_argument("--eval", help="evaluation text file")
    p.add_argument("--train", help="training text file (distillation)")
    p.add_argument("--out", help="download the artifacts here (verified)")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    p.add_argument("--hardware", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--no-wait", action="store_true", help="submit and print the job id")
    p.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    p.set_defaults(func=cmd_run)

    _add_jobs_parser(sub, common)
    _add_uploads_parser(sub, common)
    _add_webhooks_parser(sub, common)
    _add_keys_parser(sub, common)
    p = sub.add_parser("limits", parents=[common], help="this tenant's limits and usage")
    p.set_defaults(func=cmd_limits)
    return parser


def _add_jobs_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow, cancel and download jobs")
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    j = jobs.add_parser("list", parents=[common])
    j.add_argument(
        "--status", action="append", choices=["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    )
    j.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    j.add_argument("--limit", type=int, default=20)
    for name in ("get", "cancel", "wait"):
        jobs.add_parser(name, parents=[common]).add_argument("job_id")
    j = jobs.add_parser("events", parents=[common])
    j.add_argument("job_id")
    j.add_argument("--after", type=int, default=0)
    j.add_argument("--follow", "-f", action="store_true", help="stream until the job finishes")
    j = jobs.add_parser("download", parents=[common])
    j.add_argument("job_id")
    j.add_argument("--out", required=True)
    p.set_defaults(func=cmd_jobs)


def _add_uploads_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("uploads", help="upload files or folders")
    uploads = p.add_subparsers(dest="uploads_command", required=True)
    u = uploads.add_parser("create", parents=[common], help="upload a file or folder and complete it")
    u.add_argument("path")
    u.add_argument("--resume", metavar="UPLOAD_ID", help="resume this interrupted upload (PUT only what is missing)")
    u.add_argument("--concurrency", type=int, default=4)
    uploads.add_parser("get", parents=[common]).add_argument("upload_id")
    uploads.add_parser("parts", parents=[common]).add_argument("upload_id")
    p.set_defaults(func=cmd_uploads)


def _add_webhooks_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("webhooks", help="webhook endpoints and their deliveries")
    hooks = p.add_subparsers(dest="webhooks_command", required=True)
    hooks.add_parser("list", parents=[common])
    w = hooks.add_parser("create", parents=[common])
    w.add_argument("url")
    w.add_argument("--events", help="comma-separated, e.g. job.succeeded,job.failed (default: all)")
    w.add_argument("--description", default="")
    for name in ("get", "delete"):
        hooks.add_parser(name, parents=[common]).add_argument("endpoint_id")
    w = hooks.add_parser("update", parents=[common])
    w.add_argument("endpoint_id")
    w.add_argument("--url")
    w.add_argument("--events")
    w.add_argument("--description")
    w.add_argument("--enabled", choices=["on", "off"])
    w = hooks.add_parser("rotate-secret", parents=[common])
    w.add_argument("endpoint_id")
    w.add_argument("--overlap-s", type=int, default=None)
    w = hooks.add_parser("deliveries", parents=[common])
    w.add_argument("endpoint_id")
    w.add_argument("--status", choices=["pending", "delivered", "failed"])
    w = hooks.add_parser("redeliver", parents=[common])
    w.add_argument("endpoint_id")
    w.add_argument("delivery_id")
    p.set_defaults(func=cmd_webhooks)


def _add_keys_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("keys", help="this tenant's API keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    keys.add_parser("list", parents=[common]).add_argument("--include-revoked", action="store_true")
    k = keys.add_parser("create", parents=[common])
    k.add_argument("--name", default="default")
    k.add_argument("--scopes", help="comma-separated (default: the server's)")
    keys.add_parser("revoke", parents=[common]).add_argument("key_id")
    p.set_defaults(func=cmd_keys)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modelpress`` command."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SERVER_VERBS:
        # The server side, imported only for its own verbs (by name: the client is typed without it).
        server_main: Callable[[list[str]], int] = importlib.import_module("app.cli").main
        return server_main(args_list)
    from modelpress._errors import APIConnectionError, APIError, IntegrityError, UploadError

    try:
        args = build_parser().parse_args(args_list)
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"modelpress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as exc:
        print(f"modelpress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except APIError as exc:
        if args.json:
            print(
                json.dumps({"error": exc.problem.model_dump(mode="json"), "status": exc.status_code}), file=sys.stderr
            )
        else:
            detail = "".join(f"\n  {e.field}: {e.message}" for e in exc.errors)
            print(f"modelpress: API error: {exc}{detail}", file=sys.stderr)
        return EXIT_API
    except UploadError as exc:
        print(f"modelpress: {exc}", file=sys.stderr)
        return EXIT_UPLOAD
    except APIConnectionError as exc:
        print(f"modelpress: cannot reach the API: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    except IntegrityError as exc:
        print(f"modelpress: download rejected: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
