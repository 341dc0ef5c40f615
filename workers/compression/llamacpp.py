"""Speed and quality measured in llama.cpp, the runtime a GGUF file is served by (llama-cpp-python).

``measure_gguf(result, baseline, eval_ids, threads=2)`` scores both files with llama.cpp's own logits
over the very windows ModelPress's transformers perplexity uses (``evaluate.perplexity``: each
window on its own, next-token NLL, no BOS added), and times prefill and decode at batch 1.

Every speed figure is built to survive a busy machine:

* the files are timed **interleaved** in the same rounds (order alternating A B, B A, ...), so a
  burst of load hits both, and each speed-up is the median of per-round *paired* ratios;
* the spread (min and max over rounds) is reported beside every median;
* process CPU time is measured beside wall time (tokens per CPU-second do not drop when other
  processes take the cores), and
* a speed-up whose min..max range contains 1.0 is marked ``"significant": false``: not a result.

llama-cpp-python is optional (the ``gguf`` extra) and imported on first use.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from workers.compression.base import Callbacks, EngineError
from workers.compression.evaluate import perplexity_from, token_nll


def load_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module, or :class:`EngineError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:  # an optional extra: the service runs without it
        raise EngineError(
            "llama-cpp-python is not installed on this worker: install the 'gguf' extra "
            "(pip install 'modelpress[gguf]'; see the Makefile for the CMAKE_ARGS of a portable CPU build)"
        ) from exc
    return llama_cpp


def _open(path: Path, *, n_ctx: int, n_batch: int, threads: int, logits_all: bool) -> Any:
    llama_cpp = load_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def gguf_perplexity(
    path: str | Path, eval_ids: torch.Tensor, *, threads: int, callbacks: Callbacks | None = None
) -> float:
    """Perplexity of a GGUF file from llama.cpp's logits over ``eval_ids`` ``[windows, seq]``, computed
    exactly as :func:`workers.compression.evaluate.perplexity` does from transformers' logits."""
    if eval_ids.dim() != 2 or eval_ids.shape[1] < 2 or eval_ids.shape[0] == 0:
        raise EngineError(f"eval_ids must be [n >= 1, seq_len >= 2], got {list(eval_ids.shape)}")
    callbacks = callbacks or Callbacks()
    seq = int(eval_ids.shape[1])
    llm = _open(Path(path), n_ctx=seq, n_batch=seq, threads=threads, logits_all=True)
    total_nll, total_tokens = 0.0, 0
    try:
        for index, window in enumerate(eval_ids):
            callbacks.check()
            llm.reset()
            llm.eval(window.tolist())
            logits = torch.from_numpy(np.asarray(llm.scores[: seq - 1], dtype=np.float32))
            nll = token_nll(logits, window[1:].to(torch.long))
            total_nll += float(nll.double().sum())
            total_tokens += int(nll.numel())
            callbacks.progress((index + 1) / eval_ids.shape[0], f"llama.cpp perplexity window {index + 1}")
    finally:
        llm.close()
    return perplexity_from(total_nll, total_tokens)


def _time_one(llm: Any, prompt: list[int], decode: list[int]) -> dict[str, float]:
    """Prefill ``prompt`` then decode ``decode`` one token at a time: wall and process CPU seconds of each."""
    llm.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    prefill_wall, prefill_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    for token in decode:
        llm.eval([token])
    decode_wall, decode_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "prefill_tok_s": len(prompt) / prefill_wall,
        "prefill_tok_per_cpu_s": len(prompt) / max(prefill_cpu, 1e-9),
        "decode_tok_s": len(decode) / decode_wall,
        "decode_tok_per_cpu_s": len(decode) / max(decode_cpu, 1e-9),
    }


def interleaved_speed(
    paths: Mapping[str, str | Path],
    prompt: list[int],
    decode: list[int],
    *,
    threads: int,
    rounds: int,
    callbacks: Callbacks | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Per-round prefill/decode speeds of every file, all timed in the same rounds (batch 1).

    Every file is loaded once and warmed up untimed; each round then times every file once, the order
    reversed every other round so that no file always runs first after the others.
    """
    callbacks = callbacks or Callbacks()
    n_ctx = len(prompt) + len(decode) + 8
    models = {
        n: _open(Path(p), n_ctx=n_ctx, n_batch=len(prompt), threads=threads, logits_all=False) for n, p in paths.items()
    }
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    try:
        for llm in models.values():
            _time_one(llm, prompt, decode[:4])
        names = list(models)
        for index in range(rounds):
            for name in names if index % 2 == 0 else reversed(names):
                callbacks.check()
                per_round[name].append(_time_one(models[name], prompt, decode))
            callbacks.progress((index + 1) / rounds, f"llama.cpp speed round {index + 1}/{rounds}")
    finally:
        for llm in models.values():
            llm.close()
    return per_round


def spread(values: list[float]) -> dict[str, float]:
    """Median with the min and max beside it."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_speedup(result: list[dict[str, float]], baseline: list[dict[str, float]], key: str) -> dict[str, Any]:
    """``result / baseline`` of ``key`` per round (paired), its median and spread; ``significant`` is false
    when the spread contains 1.0 (the files then did not differ beyond the machine's noise)."""
    ratios = [r[key] / b[key] for r, b in zip(result, baseline, strict=True)]
    summary: dict[str, Any] = spread(ratios)
    summary["significant"] = not (summary["min"] <= 1.0 <= summary["max"])
    return summary


def file_summary(path: str | Path, rounds: list[dict[str, float]], ppl: float | None) -> dict[str, Any]:
    """One file's size, perplexity and speed spreads."""
    keys = ("prefill_tok_s", "decode_tok_s", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s")
    return {
        "file_bytes": Path(path).stat().st_size,
        "perplexity": ppl,
        **{key: spread([r[key] for r in rounds]) for key in keys},
    }


def measure_gguf(
    result_path: str | Path,
    baseline_path: str | Path,
    eval_ids: torch.Tensor,
    *,
    threads: int | None = None,
    rounds: int = 5,
    decode_tokens: int = 64,
    prefill_tokens: int = 128,
    callbacks: Callbacks | None = None,
) -> dict[str, Any]:
    """The report's llama.cpp runtime section: size, perplexity and speed of the exported file against
    the same model exported unquantized (``F16``), both run by llama.cpp on this machine.

    ``eval_ids``: the transformers evaluation windows ``[windows, seq]``. The speed prompt is the first
    ``prefill_tokens`` tokens of the first window, then ``decode_tokens`` single-token steps.
    """
    callbacks = callbacks or Callbacks()
    threads = int(threads or torch.get_num_threads())
    load_llama_cpp()
    started, load_before = time.perf_counter(), os.getloadavg()
    ppl_result = gguf_perplexity(result_path, eval_ids, threads=threads, callbacks=callbacks.scaled(0.0, 0.25))
    ppl_baseline = gguf_perplexity(baseline_path, eval_ids, threads=threads, callbacks=callbacks.scaled(0.25, 0.5))
    flat = eval_ids.reshape(-1).tolist()
    prompt = flat[: min(prefill_tokens, len(flat) - 1)]
    decode = [flat[(len(prompt) + i) % len(flat)] for i in range(decode_tokens)]
    timed = interleaved_speed(
        {"result": result_path, "baseline": baseline_path}, prompt, decode,
        threads=threads, rounds=rounds, callbacks=callbacks.scaled(0.5, 1.0),
    )  # fmt: skip
    result = file_summary(result_path, timed["result"], ppl_result)
    baseline = file_summary(baseline_path, timed["baseline"], ppl_baseline)
    return {
        "runtime": "llama.cpp",
        "version": getattr(load_llama_cpp(), "__version__", None),
        "threads": threads,
        "batch": 1,
        "rounds": rounds,
        "prefill_tokens": len(prompt),
        "decode_tokens": decode_tokens,
        "eval_windows": int(eval_ids.shape[0]),
        "eval_seq_len": int(eval_ids.shape[1]),
        "result": result,
        "baseline": baseline,
        "perplexity_change": (ppl_result / ppl_baseline - 1.0) if math.isfinite(ppl_baseline) else None,
        "size_ratio": baseline["file_bytes"] / result["file_bytes"],
        "prefill_speedup": paired_speedup(timed["result"], timed["baseline"], "prefill_tok_s"),
        "decode_speedup": paired_speedup(timed["result"], timed["baseline"], "decode_tok_s"),
        "prefill_speedup_per_cpu_s": paired_speedup(timed["result"], timed["baseline"], "prefill_tok_per_cpu_s"),
        "decode_speedup_per_cpu_s": paired_speedup(timed["result"], timed["baseline"], "decode_tok_per_cpu_s"),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "seconds": round(time.perf_counter() - started, 3),
    }
