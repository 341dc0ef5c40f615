"""The web console in a real browser against the real embedded stack (API, worker, SQLite, local storage)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from app.signing import verify
from tests.helpers import ROOT, Receiver, Stack, free_port, make_caller, upload_files, wait_until
from tests.tiny import sample_text, write_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
SCREENSHOTS = ROOT / "docs" / "console"


def screenshot(page: object, name: str, *, full_page: bool = False) -> None:
    """Write docs/console/<name>.png when CONSOLE_SCREENSHOTS=1 (the pictures in docs/console.md)."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)  # type: ignore[attr-defined]


HOSTILE_META = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">\'"'
# A file name cannot hold "/", so no closing tag here; the opening one must still come out as text.
HOSTILE_FILE = "<script>window.__pwned=3<img src=x onerror=window.__pwned=4>'\".bin"
# Records every progress percentage the job page shows, to prove it changes in place without a reload.
WATCH_PROGRESS = """() => {
  window.__seen = [];
  window.__marker = 'no reload';
  new MutationObserver(() => {
    const pct = document.getElementById('progress-pct');
    if (pct && window.__seen.at(-1) !== pct.textContent) window.__seen.push(pct.textContent);
  }).observe(document.getElementById('main'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """State handed from one test to the next (they share one stack, in file order)."""
    return {}


@pytest.fixture
def page(browser: Browser, console_stack: Stack) -> Iterator[Page]:
    context = browser.new_context(
        base_url=console_stack.base_url, accept_downloads=True, viewport={"width": 1280, "height": 860}
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())
    yield page
    context.close()
    assert not errors, errors  # no uncaught exception in the console's scripts


def sign_in(page: Page, key: str) -> None:
    page.goto("/console/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()


def test_every_console_response_has_the_csp(console_stack: Stack) -> None:
    paths = [
        "/console",
        "/console/",
        "/console/static/app.js",
        "/console/static/console.css",
        "/console/static/missing.js",
        "/console/nope",
    ]
    with httpx.Client(base_url=console_stack.base_url) as client:
        for path in paths:
            response = client.get(path)
            csp = response.headers.get("content-security-policy", "")
            assert "script-src 'self'" in csp and "default-src 'none'" in csp, (path, response.status_code)
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert response.headers["x-content-type-options"] == "nosniff"
        assert client.get("/console/").status_code == 200
        assert client.get("/console/static/missing.js").status_code == 404
        assert client.get("/console", follow_redirects=False).status_code == 308
        assert "content-security-policy" not in client.get("/healthz").headers  # the API itself is unchanged


def test_upload_quantize_watch_report_download(
    page: Page, console_stack: Stack, tmp_path: Path, shared: dict[str, Any]
) -> None:
    model_dir = write_model_dir(tmp_path / "tiny-llama")
    eval_file = tmp_path / "texts" / "eval.txt"
    eval_file.parent.mkdir()
    eval_file.write_text(sample_text(6))

    sign_in(page, console_stack.key)
    expect(page.get_by_text("No jobs yet")).to_be_visible()
    # The key lives in this tab's sessionStorage only: not in the URL, a cookie or localStorage.
    assert page.evaluate("sessionStorage.getItem('modelpress.api_key')") == console_stack.key
    assert console_stack.key not in page.url and not page.context.cookies()
    assert page.evaluate("localStorage.length") == 0
    page.get_by_role("link", name="New job").click()
    expect(page.get_by_role("heading", name="New job")).to_be_visible()

    # The model folder, hashed in the browser and PUT file by file.
    page.set_input_files("#model-files", model_dir)
    page.locator("section", has=page.locator("#model-files")).get_by_role("button", name="Upload").click()
    model_upload = page.locator("section", has=page.locator("#model-files")).locator(".upload-id")
    expect(model_upload).to_have_text(re.compile(r"^upl_"), timeout=60_000)
    shared["model_upload"] = model_upload.inner_text()
    expect(page.locator('[data-path="model.upload_id"] input')).to_have_value(shared["model_upload"])
    for name in ("config.json", "model.safetensors"):
        expect(page.locator(f'.files li[data-path="{name}"]')).to_contain_text("uploaded")
    page.set_input_files("#text-files", eval_file)
    page.locator("section", has=page.locator("#text-files")).get_by_role("button", name="Upload").click()
    eval_upload = page.locator("section", has=page.locator("#text-files")).locator(".upload-id")
    expect(eval_upload).to_have_text(re.compile(r"^upl_"), timeout=60_000)

    # The spec form is generated from /openapi.json; the API's own validation messages come back per field.
    shared["text_upload"] = eval_upload.inner_text()
    page.locator('[data-path="evaluation.upload_id"] input').fill(shared["text_upload"])
    page.locator('[data-path="evaluation.seq_len"] input').fill("64")
    page.locator('[data-path="evaluation.max_tokens"] input').fill("512")
    page.locator("#metadata").fill("suite=console")
    page.locator('[data-path="steps.0.scheme"] select').select_option("w8a16")
    page.locator('[data-path="steps.0.dampening_frac"] input').fill("2")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator('[data-path="steps.0.dampening_frac"] .field-error')).to_contain_text("less than or equal to 1")
    expect(page.locator('[data-path="steps.0.dampening_frac"] input')).to_have_attribute("aria-invalid", "true")
    page.locator('[data-path="steps.0.dampening_frac"] input').fill("")
    # A rule of the step as a whole is shown on the step's fieldset.
    page.locator('[data-path="steps.0.activations"] select').select_option("static")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator('[data-path="steps.0"] > .field-error')).to_contain_text("activations applies to w8a8 only")
    page.locator('[data-path="steps.0.activations"] select').select_option("")
    # group_size null (one scale per output channel) is a choice of its own, not the default ('auto').
    page.locator('[data-path="steps.0.group_size"] select').select_option(label="null")
    page.locator('[data-path="steps.0.algorithm"] select').select_option("rtn")

    page.evaluate(WATCH_PROGRESS)
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=240_000)
    job_id = page.url.rsplit("/", 1)[-1]
    seen = page.evaluate("window.__seen")
    assert page.evaluate("window.__marker") == "no reload"
    assert seen[-1] == "100 %" and any(s not in ("0 %", "100 %") for s in seen), seen
    expect(page.locator("#event-log")).to_contain_text("job.succeeded")
    expect(page.locator("#steps")).to_contain_text("succeeded")

    # The report: headline ratios, the chart, the before/after table, the model card, the artifacts.
    expect(page.locator("#summary")).to_contain_text("Size")
    expect(page.locator("#before-after")).to_contain_text("Perplexity")
    page.wait_for_function("document.querySelector('img.chart')?.naturalWidth > 0")
    expect(page.locator("#model-card pre")).not_to_be_empty()
    row = page.locator('#artifacts tr[data-path="model/model.safetensors"]')
    shown_sha = row.locator("code.sha256").inner_text()
    with page.expect_download() as download_info:
        row.get_by_role("link").click()
    data = Path(download_info.value.path()).read_bytes()
    assert hashlib.sha256(data).hexdigest() == shown_sha
    with console_stack.client() as client:
        listing = {a["path"]: a["sha256"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert listing["model/model.safetensors"] == shown_sha
    screenshot(page, "report", full_page=True)

    page.get_by_role("link", name="Jobs", exact=True).click()
    job_row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(job_row).to_contain_text("succeeded")
    expect(job_row).to_contain_text("quantize w8a16")
    expect(job_row).to_contain_text("suite=console")
    shared["job_id"] = job_id


def test_an_interrupted_upload_resumes_without_sending_twice(page: Page, console_stack: Stack, tmp_path: Path) -> None:
    files = {"alpha.txt": "alpha " * 500, "bravo.txt": "bravo " * 500}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    puts: list[str] = []

    def storage(route: Route) -> None:
        if route.request.method != "PUT":
            route.continue_()
            return
        # The signed URL names the storage key it may write (a File body is not visible to the route).
        payload = verify(console_stack.env["MODELPRESS_SIGNING_SECRET"], route.request.url.rsplit("/", 1)[-1])
        name = str(payload["key"]).rsplit("/", 1)[-1]
        puts.append(name)
        if name == "bravo.txt" and puts.count("bravo.txt") == 1:
            route.abort()  # the connection drops while the second file goes up
        else:
            route.continue_()

    page.route("**/v1/storage/**", storage)
    sign_in(page, console_stack.key)
    page.goto("/console/#/new")
    section = page.locator("section", has=page.locator("#text-files"))
    page.set_input_files("#text-files", [tmp_path / name for name in files])
    section.get_by_role("button", name="Upload").click()
    expect(section.get_by_role("alert")).to_contain_text("Upload failed")
    section.get_by_role("button", name="Upload").click()
    expect(section.locator(".upload-id")).to_have_text(re.compile(r"^upl_"))
    assert sorted(puts) == ["alpha.txt", "bravo.txt", "bravo.txt"], puts  # alpha went up once
    with console_stack.client() as client:
        upload = client.get(f"/v1/uploads/{section.locator('.upload-id').inner_text()}").json()
    assert upload["status"] == "complete" and {f["path"] for f in upload["files"]} == set(files)


def test_cancel_a_running_job(page: Page, console_stack: Stack, shared: dict[str, Any]) -> None:
    # Distillation for a million steps: it runs until cancelled, and checks for cancellation every step.
    with console_stack.client() as client:
        job = client.post(
            "/v1/jobs",
            json={
                "model": {"upload_id": shared["model_upload"]},
                "training": {"upload_id": shared["text_upload"]},
                "steps": [
                    {
                        "method": "distill",
                        "student": {"from_teacher": {"layers": [0]}},
                        "max_steps": 1_000_000,
                        "batch_size": 2,
                        "seq_len": 32,
                    }
                ],
                "metadata": {"suite": "console", "kind": "long"},
            },
        )
        assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    sign_in(page, console_stack.key)
    page.goto(f"/console/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("running", timeout=240_000)
    expect(page.locator("#progress-message")).to_contain_text("step", timeout=120_000)
    screenshot(page, "running")

    page.goto("/console/#/jobs")
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_contain_text("running")
    screenshot(page, "jobs")

    page.goto(f"/console/#/jobs/{job_id}")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=120_000)
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    expect(page.locator("#event-log")).to_contain_text("job.cancelled")
    shared["cancelled_id"] = job_id

    # Filters go to the API (status=, metadata[k]=v) and stay in the address, so Back works.
    page.goto("/console/#/jobs")
    page.get_by_label("Metadata").fill("kind=long")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_be_visible()
    page.get_by_label("Metadata").fill("")
    page.get_by_label("Status").select_option("succeeded")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(f'tr[data-job-id="{shared["job_id"]}"]')).to_be_visible()
    expect(page.locator("tbody tr")).to_have_count(1)
    page.go_back()
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_be_visible()


def test_hostile_strings_render_as_text(page: Page, console_stack: Stack, shared: dict[str, Any]) -> None:
    # A pickle file is refused by the worker with a reason that names it: the reason carries the markup.
    with console_stack.client() as client:
        upload = upload_files(client, {}, {HOSTILE_FILE: b"not really a pickle", "config.json": b"{}"})
        created = client.post(
            "/v1/jobs",
            json={
                "model": {"upload_id": upload},
                "steps": [{"method": "quantize", "scheme": "w8a16"}],
                "metadata": {"note": HOSTILE_META},
            },
        )
        assert created.status_code == 201, created.text
    job = console_stack.wait_for(created.json()["id"], {"failed", "succeeded", "cancelled"})
    assert job["status"] == "failed" and "<script>" in job["error"]["message"], job
    sign_in(page, console_stack.key)
    expect(page.locator(f'tr[data-job-id="{job["id"]}"] .tag')).to_have_text(f"note={HOSTILE_META}")
    assert page.locator("#main script, #main img").count() == 0
    page.goto(f"/console/#/jobs/{job['id']}")
    expect(page.locator("#job-error-message")).to_have_text(job["error"]["message"])
    expect(page.locator("#metadata li")).to_have_text(f"note = {HOSTILE_META}")
    assert page.locator("#main script, #main img").count() == 0
    assert page.evaluate("window.__pwned") is None
    # Even markup that did reach the DOM could not run: the browser enforces the CSP on inline script.
    violated = page.evaluate(
        """() => new Promise((resolve) => {
          document.addEventListener('securitypolicyviolation', (e) => resolve(e.effectiveDirective), {once: true});
          const s = document.createElement('script');
          s.textContent = 'window.__inline = 1';
          document.body.append(s);
        })"""
    )
    assert violated.startswith("script-src") and page.evaluate("window.__inline") is None
    shared["failed_id"] = job["id"]


def test_keys_and_webhooks(page: Page, console_stack: Stack, shared: dict[str, Any]) -> None:
    # The stack's key has the default scopes; managing keys takes keys:manage.
    manager = make_caller("console-keys", ["jobs:read", "jobs:write", "webhooks:manage", "keys:manage"])
    sign_in(page, manager.key)
    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name").fill("read-only <b>bot</b>")
    page.get_by_label("jobs:write").uncheck()
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#key-notice .secret-value")
    expect(secret).to_have_text(re.compile(r"^mp_"))
    new_key = secret.inner_text()
    expect(page.locator("tr", has_text="read-only <b>bot</b>")).to_contain_text("jobs:read")
    with httpx.Client(base_url=console_stack.base_url, headers={"Authorization": f"Bearer {new_key}"}) as client:
        assert client.get("/v1/jobs").status_code == 200
        assert client.post("/v1/uploads", json={"files": []}).status_code == 403
    page.locator("tr", has_text="read-only <b>bot</b>").get_by_role("button", name="Revoke").click()
    expect(page.locator("tr", has_text="read-only <b>bot</b>")).to_contain_text("revoked")
    assert (
        httpx.get(console_stack.base_url + "/v1/jobs", headers={"Authorization": f"Bearer {new_key}"}).status_code
        == 401
    )

    # Webhooks: a real receiver on loopback (the stack allows plain http to 127.0.0.1).
    receiver = Receiver(port=free_port())
    receiver.start()
    try:
        page.get_by_role("link", name="Webhooks").click()
        page.get_by_label("URL").fill(receiver.url)
        page.get_by_label("job.queued").check()
        page.get_by_role("button", name="Create endpoint").click()
        expect(page.locator("#webhook-notice .secret-value")).to_have_text(re.compile(r"^whsec_"))
        endpoint_row = page.locator("tr", has_text=receiver.url)
        expect(endpoint_row).to_contain_text("enabled")
        with httpx.Client(
            base_url=console_stack.base_url, headers={"Authorization": f"Bearer {manager.key}"}, timeout=30
        ) as client:
            upload = upload_files(client, {}, {"config.json": b"{}"})
            job = client.post(
                "/v1/jobs", json={"model": {"upload_id": upload}, "steps": [{"method": "quantize", "scheme": "w8a16"}]}
            )
            assert job.status_code == 201, job.text
        wait_until(receiver.accepted, 60, "the relay to deliver job.queued")
        # The receiver answers before the relay records the answer: wait for the record, then open the list.
        with httpx.Client(
            base_url=console_stack.base_url, headers={"Authorization": f"Bearer {manager.key}"}, timeout=30
        ) as client:
            endpoint_id = client.get("/v1/webhooks").json()["data"][0]["id"]

            def recorded() -> bool:
                deliveries = client.get(f"/v1/webhooks/{endpoint_id}/deliveries").json()["data"]
                return any(d["status"] == "delivered" for d in deliveries)

            wait_until(recorded, 30, "the relay to record the delivery")
        endpoint_row.get_by_role("button", name="Deliveries").click()
        delivery = page.locator("#deliveries tr", has_text="job.queued")
        expect(delivery).to_contain_text("delivered")
        expect(delivery).to_contain_text("HTTP 200")
        delivery.get_by_role("button", name="Redeliver").click()
        expect(page.locator("#webhook-notice")).to_contain_text("queued again")
        wait_until(lambda: len(receiver.requests) >= 2, 60, "the redelivery")
        first, again = receiver.requests[0], receiver.requests[1]
        assert again.headers["webhook-id"] == first.headers["webhook-id"]  # the same delivery, sent again

        endpoint_row.get_by_role("button", name="Rotate secret").click()
        expect(page.locator("#webhook-notice")).to_contain_text("New signing secret")
        page.locator("tr", has_text=receiver.url).get_by_role("button", name="Disable").click()
        expect(page.locator("tr", has_text=receiver.url)).to_contain_text("disabled")
    finally:
        receiver.stop()
    shared["webhook_url"] = receiver.url


def test_another_tenant_sees_none_of_it(page: Page, console_stack: Stack, shared: dict[str, Any]) -> None:
    other = make_caller("console-other")
    sign_in(page, other.key)
    expect(page.get_by_text("No jobs yet")).to_be_visible()
    for job_id in (shared["job_id"], shared["cancelled_id"], shared["failed_id"]):
        page.goto(f"/console/#/jobs/{job_id}")
        expect(page.get_by_role("alert")).to_contain_text("Not Found")
        expect(page.locator("#job-status")).to_have_count(0)
    page.get_by_role("link", name="API keys").click()
    expect(page.get_by_role("heading", name="API keys")).to_be_visible()
    expect(page.locator("#main")).not_to_contain_text(console_stack.key[:16])
    page.get_by_role("link", name="Webhooks").click()
    expect(page.get_by_role("heading", name="Webhooks")).to_be_visible()
    expect(page.locator("#main")).not_to_contain_text(shared["webhook_url"])
