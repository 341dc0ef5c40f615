"""Client upload benchmark (issue 17): peak RSS of ``ModelPress().uploads.upload()`` on a 2 GiB folder, and
its PUT throughput to the embedded API's local storage next to ``curl --upload-file`` of the same bytes.

    .venv/bin/python -m bench.sdk_upload [--gib 2] [--files 4] [--concurrency 4]

Starts its own embedded API (uvicorn, SQLite, local storage) in a temporary folder under /tmp, writes sparse
files there (holes read as zeros: no disk is read, so client and server are what is measured), and deletes it
all afterwards. Each SDK upload runs in a child process whose peak RSS the kernel reports (``wait4``); the
timed phase is the PUTs (hashing and the server's verification are reported beside it). curl PUTs the same
files to fresh URLs of a second upload, one process per file, as many at once as the SDK's concurrency.
Files stay below the multipart threshold so both sides send one PUT per file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "mp_bench_upload_key"
CHILD = r"""
import json, sys, time
from modelpress import ModelPress
from modelpress import _transfer

timings = {}
original_hash, original_run = _transfer.hash_files, _transfer.PieceUploader.run

def timed_hash(*a, **k):
    t = time.perf_counter(); out = original_hash(*a, **k); timings["hash_s"] = time.perf_counter() - t; return out

def timed_run(self, pieces):
    t = time.perf_counter(); original_run(self, pieces); timings["put_s"] = time.perf_counter() - t

import modelpress._client as client_module
client_module.hash_files = timed_hash
_transfer.PieceUploader.run = timed_run
folder, concurrency = sys.argv[1], int(sys.argv[2])
with ModelPress() as mp:
    t = time.perf_counter()
    upload = mp.uploads.upload(folder, concurrency=concurrency)
    timings["total_s"] = time.perf_counter() - t
timings["status"] = upload.status
print(json.dumps(timings))
"""


def _zeros_sha256(size: int) -> str:
    digest, block = hashlib.sha256(), bytes(8 * 1024 * 1024)
    left = size
    while left:
        n = min(left, len(block))
        digest.update(block[:n])
        left -= n
    return digest.hexdigest()


def _sdk_upload(folder: Path, env: dict[str, str], concurrency: int) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), str(concurrency)], cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"SDK upload failed: {out}")
    result = json.loads(out)
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result  # type: ignore[no-any-return]


def _curl_upload(folder: Path, api: httpx.Client, concurrency: int) -> float:
    files = sorted(folder.iterdir())
    body = {"files": [{"path": f.name, "size": f.stat().st_size, "sha256": "0" * 64} for f in files]}
    created = api.post("/v1/uploads", json=body)
    created.raise_for_status()
    urls = {t["path"]: t["url"] for t in created.json()["targets"]}
    started = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for f in files:
        if len(running) >= concurrency:
            running.pop(0).wait()
        cmd = ["curl", "-sS", "--fail", "-H", "Expect:", "-o", "/dev/null", "--upload-file", str(f), urls[f.name]]
        running.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in running]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"curl failed: {codes}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="modelpress-bench-upload-", dir="/tmp"))
    folder, data = work / "model", work / "var"
    folder.mkdir()
    size = int(args.gib * 1024**3) // args.files
    for i in range(args.files):
        with (folder / f"model-{i:05d}-of-{args.files:05d}.safetensors").open("wb") as handle:
            handle.truncate(size)  # sparse
    total = size * args.files
    port = 18000 + os.getpid() % 1000
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(data),
        "MODELPRESS_BOOTSTRAP_API_KEY": KEY,
        "MODELPRESS_PUBLIC_BASE_URL": base,
        "MODELPRESS_S3_MULTIPART_THRESHOLD_BYTES": str(size + 1),
        "MODELPRESS_API_KEY": KEY,
        "MODELPRESS_BASE_URL": base,
    }
    subprocess.run([sys.executable, "-m", "modelpress", "migrate"], cwd=ROOT, env=env, check=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    rows = []
    try:
        for _ in range(100):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        for concurrency in args.concurrency:
            curl_s = _curl_upload(folder, api, concurrency)
            shutil.rmtree(data / "storage" / "uploads", ignore_errors=True)
            sdk = _sdk_upload(folder, env, concurrency)
            shutil.rmtree(data / "storage" / "uploads", ignore_errors=True)
            rows.append(
                {
                    "concurrency": concurrency,
                    "bytes": total,
                    "sdk_put_mib_s": total / 2**20 / sdk["put_s"],
                    "curl_mib_s": total / 2**20 / curl_s,
                    "sdk_vs_curl": curl_s / sdk["put_s"],
                    "sdk_hash_s": sdk["hash_s"],
                    "sdk_total_s": sdk["total_s"],
                    "sdk_peak_rss_mib": sdk["peak_rss_mib"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    print(f"\n{cpu}, {os.cpu_count()} cores, load {load[0]:.1f}/{load[1]:.1f}")
    columns = ["PUTs at once", "SDK PUT MiB/s", "curl MiB/s", "SDK / curl", "SDK hash s"]
    columns += ["SDK total s (incl. server verify)", "SDK peak RSS MiB"]
    print("| " + " | ".join(columns) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['sdk_put_mib_s']:.0f} | {r['curl_mib_s']:.0f} | {r['sdk_vs_curl']:.0%} | "
            f"{r['sdk_hash_s']:.1f} | {r['sdk_total_s']:.1f} | {r['sdk_peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
