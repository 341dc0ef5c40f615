"""Shared pieces of the benchmark harness, imported by both sides (ModelPress venv and .venv-llmc).

Everything that decides whether two numbers are comparable lives here and only here: the cache
paths, the calibration token blocks, the perplexity function, the timing/RSS probes and the JSON
line writer. Depends on torch and transformers only (both venvs have them, at different versions).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
RESULTS = Path(os.environ.get("BENCH_RESULTS", str(BENCH_DIR / "results")))
MODEL_DIR = CACHE / "smollm2-135m"
CALIB_TXT = CACHE / "calib.txt"
EVAL_TXT = CACHE / "eval.txt"

# Defaults of every comparison (issue 8): 32 calibration samples x 256 tokens; perplexity over
# non-overlapping 512-token windows of at most 2k evaluation tokens (16k suggested; 2k fits the
# time budget on 2 heavily shared cores — BENCH_EVAL_TOKENS=16384 to widen).
CALIB_SAMPLES = 32
CALIB_SEQ_LEN = 256
EVAL_SEQ_LEN = 512
EVAL_MAX_TOKENS = int(os.environ.get("BENCH_EVAL_TOKENS", "2048"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def limit_threads(n: int = THREADS) -> None:
    """Pin torch (and BLAS) to ``n`` threads: the machine is shared, and timings must be comparable.
    The variables count only before torch is first imported; ``set_num_threads`` works either way."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)
    with suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)


def load_tokenizer(model_dir: Path = MODEL_DIR) -> Any:
    """The reference model's tokenizer (saved next to the checkpoint by reference_model.py)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_model(model_dir: Path = MODEL_DIR) -> Any:
    """The reference model in float32, eval mode, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


# The small timing case: a ~10M-parameter, 4-layer Llama (random weights; only wall time
# means something there), SmolLM2's vocabulary so the same calibration ids apply.
SMALL_DIR = CACHE / "llama-10m-4layer"
SMALL_CONFIG = {
    "vocab_size": 49152,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def model_dir_for(recipe: str) -> Path:
    """The checkpoint a recipe runs on: ``*_10m`` recipes use the small Llama (created on first use)."""
    if not recipe.endswith("_10m"):
        return MODEL_DIR
    if not (SMALL_DIR / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL_CONFIG))
        tmp = SMALL_DIR.with_suffix(".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer().save_pretrained(tmp)
        tmp.rename(SMALL_DIR)
    return SMALL_DIR


def calibration_ids(
    tokenizer: Any, num_samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN, path: Path = CALIB_TXT
) -> Any:
    """Calibration input ids ``[num_samples, seq_len]``: calib.txt as one document, packed into blocks by the
    service's own ``calibration_blocks``, so both tools see exactly the same tokens (``ids_digest`` goes into
    every result line to prove it). ``workers.compression.data`` needs only torch, which both venvs have."""
    from workers.compression.data import calibration_blocks

    blocks = calibration_blocks(tokenizer, [path], seq_len, num_samples)
    if blocks.shape[0] < num_samples:
        raise RuntimeError(f"calibration text too short: {blocks.shape[0]} blocks of {seq_len}, want {num_samples}")
    return blocks


def eval_ids(tokenizer: Any, path: Path = EVAL_TXT) -> Any:
    """The evaluation text as one 1-D id stream (eval.txt as one document)."""
    from workers.compression.data import tokenize_stream

    return tokenize_stream(tokenizer, [path.read_text(encoding="utf-8")])


def ids_digest(ids: Any) -> str:
    """Short sha256 of a token-id tensor: equal digests = identical inputs across tools."""
    return hashlib.sha256(ids.to("cpu").contiguous().numpy().tobytes()).hexdigest()[:12]


def eval_windows(stream: Any, seq_len: int = EVAL_SEQ_LEN, max_tokens: int = EVAL_MAX_TOKENS) -> Any:
    """The non-overlapping ``[n, seq_len]`` windows of the first ``max_tokens`` tokens that are scored."""
    n_windows = min(stream.numel(), max_tokens) // seq_len
    if n_windows == 0:
        raise RuntimeError(f"evaluation text too short for one window of {seq_len}")
    return stream[: n_windows * seq_len].view(n_windows, seq_len)


def perplexity(
    model: Any,
    stream: Any,
    seq_len: int = EVAL_SEQ_LEN,
    max_tokens: int = EVAL_MAX_TOKENS,
    batch_size: int = 4,
) -> dict[str, float]:
    """Perplexity over non-overlapping ``seq_len`` windows of the first ``max_tokens`` tokens.

    Each window is scored independently (no carried context): the first token of a window is
    context only, so a window contributes ``seq_len - 1`` predictions. The result is
    ``exp(total NLL / total predictions)``. The one function both tools are scored with.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    windows = eval_windows(stream, seq_len, max_tokens)
    n_windows = windows.shape[0]
    total_nll = 0.0
    total = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n_windows, batch_size):
            batch = windows[i : i + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total += batch[:, 1:].numel()
    return {
        "ppl": math.exp(total_nll / total),
        "eval_tokens": n_windows * seq_len,
        "eval_windows": n_windows,
        "eval_s": time.perf_counter() - start,
    }


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB): ``VmHWM``, not ``ru_maxrss``, which Linux
    carries across fork + exec (a child would report its parent's size)."""
    with suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Timing:
    """What :func:`measure` records: wall and CPU seconds and RSS around one call."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_before_mib: float = 0.0
    peak_rss_mib: float = 0.0
    matmul_gflops: float | None = None

    def fields(self) -> dict[str, float | None]:
        """The result line's fields, rounded as every result line has them."""
        return {
            "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
            "rss_before_mib": round(self.rss_before_mib, 1),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "matmul_gflops_beside": None if self.matmul_gflops is None else round(self.matmul_gflops, 1),
        }


# Recipes whose wall time is compared with a FLOP floor (bench/flops.py).
FLOOR_RECIPES = ("w4a16_gptq_g64",)


def matmul_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained fp32 GFLOP/s of ``torch.mm(n x n, n x n)`` on this machine (best of 3 bursts)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    best = 0.0
    for _ in range(3):
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b, out=c)
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


@contextmanager
def measure(matmul_rate: bool = False) -> Iterator[Timing]:
    """Time a block (wall + process CPU) and read the process's peak RSS at its end.

    Run each recipe in a fresh process so ``peak_rss_mib`` is that recipe's peak (it also counts
    the loaded float32 model and the calibration data, which ``rss_before_mib`` shows alone).
    With ``matmul_rate`` the machine's matmul rate is measured right before and right after the
    block (outside its time) and the higher kept: this shared machine's rate drifts by 30 % and
    more within an hour, so a FLOP floor is only fair beside the run it judges.
    """
    before = matmul_gflops(seconds=1.5) if matmul_rate else None
    timing = Timing(rss_before_mib=rss_mib())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    yield timing
    timing.wall_s = time.perf_counter() - wall0
    timing.cpu_s = time.process_time() - cpu0
    timing.peak_rss_mib = peak_rss_mib()
    if before is not None:
        timing.matmul_gflops = max(before, matmul_gflops(seconds=1.5))


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages: the machine is shared, so every line records how busy it was."""
    return [round(x, 2) for x in os.getloadavg()]


def sparsity_of(model: Any, skip: tuple[str, ...] = ("lm_head",)) -> float:
    """Fraction of exact zeros over the decoder's Linear weights (``lm_head`` excluded)."""
    import torch

    zeros = 0
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
            w = module.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def count_params(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def cpu_model() -> str:
    """The CPU's model name (timings of different machines must not be compared as one)."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Versions that matter for reproducing a line."""
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def write_result(file_name: str, record: dict[str, Any]) -> None:
    """Append one JSON line to ``bench/results/<file_name>`` (and echo it to stdout)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"time": _dt.datetime.now().isoformat(timespec="seconds"), "load_avg": load_avg(), **record}
    line = json.dumps(record, sort_keys=False)
    with open(RESULTS / file_name, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line, flush=True)


def fail(message: str) -> None:
    """Print to stderr and exit non-zero."""
    print(message, file=sys.stderr)
    raise SystemExit(1)


def run_recipes(
    tool: str,
    module: str,
    choices: list[str],
    run_child: Callable[[str], None],
    result_file: Callable[[str], str],
) -> None:
    """The command line of one side of the comparison (``python -m <module>``): run the named recipes (default:
    all ``choices``), each in a fresh process (``--child``, which calls ``run_child``), one at a time; a recipe
    whose process fails gets an error line in ``result_file(recipe)``."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or tool).split("\n")[0])
    parser.add_argument("recipes", nargs="*", help=f"any of {', '.join(choices)} (default: all)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    recipes = args.recipes or list(choices)
    unknown = [r for r in recipes if r not in choices]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(choices)}")
    if args.child:
        run_child(recipes[0])
        return
    failed = []
    for name in recipes:
        print(f"== {tool} {name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", module, "--child", name], cwd=ROOT)
        if proc.returncode != 0:
            failed.append(name)
            write_result(result_file(name), {"tool": tool, "recipe": name, "error": f"exit {proc.returncode}"})
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
