"""The client package: no server dependencies on import, webhook verification, every resource against the
real embedded stack, and the CLI's exit codes and key handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelpress import AuthenticationError, ModelPress, PermissionDeniedError
from modelpress.webhooks import WebhookVerificationError, verify
from tests.helpers import ROOT, Stack, make_caller

HEAVY = ("torch", "transformers", "fastapi", "starlette", "sqlalchemy", "celery", "kombu", "boto3", "app.main")


def test_import_loads_no_server_or_torch_modules() -> None:
    code = (
        "import sys, modelpress, modelpress.webhooks, modelpress.cli, modelpress.steps\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_step_models_are_the_servers_own() -> None:
    from app.jobs.spec import QuantizeStep as ServerQuantizeStep
    from modelpress._client import _step_dict
    from modelpress.steps import QuantizeStep

    assert QuantizeStep is ServerQuantizeStep
    step = _step_dict(QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=64))
    assert step["method"] == "quantize" and step["group_size"] == 64


def test_webhook_verify_returns_a_typed_event() -> None:
    from standardwebhooks import Webhook

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = json.dumps(
        {
            "type": "job.succeeded",
            "timestamp": "2026-12-03T09:00:00Z",
            "data": {"job_id": "job_1", "status": "succeeded", "summary": {"size_ratio": 0.3}},
        }
    )
    now = datetime.now(UTC)
    headers = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": Webhook(secret).sign("msg_1", now, body),
    }
    event = verify(body, headers, secret)
    assert event.type == "job.succeeded" and event.data.job_id == "job_1" and event.webhook_id == "msg_1"
    assert event.data.summary == {"size_ratio": 0.3}
    with pytest.raises(WebhookVerificationError):
        verify(body.replace("job_1", "job_2"), headers, secret)


def test_every_resource_against_the_stack(proxied_stack: Stack, mp: ModelPress) -> None:
    owner = make_caller("owner", ["jobs:read", "jobs:write", "webhooks:manage", "keys:manage"])
    with ModelPress(api_key=owner.key, base_url=mp.base_url) as client:
        _resources(client, make_caller("operator", scopes=["admin"]).key)


def _resources(mp: ModelPress, admin_key: str) -> None:
    hook = mp.webhooks.create("http://127.0.0.1:9/hook", events=["job.succeeded"], description="ci")
    assert hook.secret.startswith("whsec_")
    assert [h.id for h in mp.webhooks.list()] == [hook.id]
    assert mp.webhooks.update(hook.id, description="renamed").description == "renamed"
    rotated = mp.webhooks.rotate_secret(hook.id, overlap_s=60)
    assert rotated.secret != hook.secret and rotated.previous_secret_expires_at is not None
    assert list(mp.webhooks.deliveries(hook.id)) == []
    mp.webhooks.delete(hook.id)
    assert list(mp.webhooks.list()) == []

    key = mp.keys.create(name="ci", scopes=["jobs:read"])
    with ModelPress(api_key=key.key, base_url=mp.base_url) as reader:
        assert reader.jobs.list().data == []
        with pytest.raises(PermissionDeniedError):
            reader.webhooks.list()
    mp.keys.revoke(key.id)
    assert key.id in {k.id for k in mp.keys.list(include_revoked=True)}
    with ModelPress(api_key=key.key, base_url=mp.base_url) as revoked, pytest.raises(AuthenticationError):
        revoked.limits.get()

    with ModelPress(api_key=admin_key, base_url=mp.base_url) as ops:
        tenant = ops.admin.create_tenant("acme", max_running_jobs=1)
        assert ops.admin.get_tenant(tenant.id).overrides.max_running_jobs == 1
        assert ops.admin.update_tenant(tenant.id, {"max_running_jobs": None}).overrides.max_running_jobs is None
        assert tenant.id in {t.id for t in ops.admin.list_tenants()}
        created = ops.admin.create_key(tenant.id, name="first", scopes=["jobs:read"])
        assert [k.id for k in ops.admin.list_keys(tenant.id)] == [created.id]
        ops.admin.revoke_key(created.id)
        assert ops.admin.list_keys(tenant.id) == []


def _cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelpress", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_exit_codes_and_key_sources(proxied_stack: Stack, mp: ModelPress, tmp_path: Path) -> None:
    env = {"MODELPRESS_BASE_URL": mp.base_url, "MODELPRESS_API_KEY": proxied_stack.key}
    assert _cli("jobs", "list", "--json", env=env).stdout.strip() == "[]"
    assert _cli("jobs", "frobnicate", env=env).returncode == 2  # usage
    no_key = {k: v for k, v in os.environ.items() if k != "MODELPRESS_API_KEY"}
    missing = subprocess.run(
        [sys.executable, "-m", "modelpress", "limits", "--base-url", mp.base_url],
        cwd=ROOT,
        env=no_key,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "MODELPRESS_API_KEY" in missing.stderr
    from_stdin = _cli(
        "limits",
        "--json",
        "--api-key-file",
        "-",
        env={"MODELPRESS_BASE_URL": mp.base_url},
        stdin=proxied_stack.key + "\n",
    )
    assert from_stdin.returncode == 0 and json.loads(from_stdin.stdout)["object"] == "limits"
    not_found = _cli("jobs", "get", "job_nope", "--json", env=env)
    assert not_found.returncode == 3 and json.loads(not_found.stderr)["status"] == 404
    unreachable = _cli("jobs", "list", "--base-url", "http://127.0.0.1:9", env={**env, "MODELPRESS_BASE_URL": ""})
    assert unreachable.returncode == 4

    (tmp_path / "recipe.json").write_text(json.dumps({"steps": [{"method": "quantize", "scheme": "w8a16"}]}))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    submitted = _cli("run", str(folder), "--recipe", str(tmp_path / "recipe.json"), "--no-wait", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    assert _cli("jobs", "cancel", job_id, env=env).returncode == 0
    waited = _cli("jobs", "wait", job_id, "--json", env=env)
    assert waited.returncode == 1 and json.loads(waited.stdout)["status"] == "cancelled"  # not a success
    events = _cli("jobs", "events", job_id, "--json", env=env).stdout.splitlines()
    assert [json.loads(line)["type"] for line in events] == ["job.queued", "job.cancelled"]
    # Server verbs still go to app.cli.
    assert "serve" in _cli("serve", "--help").stdout


@pytest.mark.slow  # a stack of processes per test: `make test` runs it
def test_async_client(proxied_stack: Stack, mp: ModelPress, tmp_path: Path) -> None:
    import asyncio

    from modelpress import AsyncModelPress

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    async def scenario() -> tuple[str, list[str], str]:
        async with AsyncModelPress(api_key=proxied_stack.key, base_url=mp.base_url) as amp:
            upload = await amp.uploads.upload(folder)
            job = await amp.jobs.create(model=upload.id, steps=[{"method": "quantize", "scheme": "w8a16"}])
            await amp.jobs.cancel(job.id)
            types = [event.type async for event in amp.jobs.stream(job.id)]
            done = await amp.jobs.wait(job.id)
            return upload.status, types, done.status

    assert asyncio.run(scenario()) == ("complete", ["job.queued", "job.cancelled"], "cancelled")
