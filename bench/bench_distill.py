"""Distillation benchmark: does the teacher's signal beat plain labels at the same token budget?

Teacher: /work/shared/models/tiny-llama-man (6 layers). Student: half its layers, cut from the teacher
(``from_teacher.keep_ratio = 0.5``, evenly spaced). Three runs with the same steps, batch and data
order: CE only (labels), KD only, KD + CE. Prints eval perplexity of each and of the teacher and the
cut student before training; writes ``docs/bench/distill.md`` and ``bench/results/distill.json``.

    .venv/bin/python -m bench.bench_distill            # ~3 minutes per run on a shared 2-core machine
    .venv/bin/python -m bench.bench_distill --steps 20  # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.jobs.spec import DistillStep, StudentSpec
from bench.common import limit_threads
from workers.compression.base import Callbacks
from workers.compression.data import tokenize_stream
from workers.compression.distill import build_student, distill

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = Path("/work/shared/models/tiny-llama-man")
DOC = ROOT / "docs" / "bench" / "distill.md"
RESULT = ROOT / "bench" / "results" / "distill.json"

VARIANTS = {  # name -> (kl_weight, ce_weight)
    "CE only (labels)": (0.0, 1.0),
    "KD only": (1.0, 0.0),
    "KD + CE": (1.0, 0.5),
}


def cpu_model() -> str:
    """``lscpu`` model name (the machine line of the report)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def _printer(name: str) -> Callable[[dict[str, Any]], None]:
    """A metrics sink that prints every 10th step, so a slow run shows it is alive."""

    def show(metrics: dict[str, Any]) -> None:
        if metrics["step"] % 10 == 0:
            print(f"  [{name}] step {metrics['step']} loss {metrics['train_loss']:.3f}", flush=True)

    return show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--eval-windows", type=int, default=40, help="eval.txt windows of seq_len tokens")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    limit_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    budget = args.steps * args.batch_size * args.seq_len
    # read only as much training text as the budget needs (~4 bytes a token, with margin)
    train_text = (TEACHER_DIR / "train.txt").read_text(encoding="utf-8")[: budget * 6]
    train_ids = tokenize_stream(tokenizer, [train_text])
    eval_text = (TEACHER_DIR / "eval.txt").read_text(encoding="utf-8")
    eval_ids = tokenize_stream(tokenizer, [eval_text])[: args.eval_windows * args.seq_len]
    spec = StudentSpec(from_teacher={"keep_ratio": 0.5})

    results: list[dict[str, Any]] = []
    for name, (kl, ce) in VARIANTS.items():
        config = DistillStep(
            student=spec,
            kl_weight=kl,
            ce_weight=ce,
            temperature=args.temperature,
            max_steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            learning_rate=args.lr,
            warmup_steps=max(1, args.steps // 20),
            eval_every=10**6,
            checkpoint_every=10**6,
        )
        student = build_student(teacher, spec)
        start = time.perf_counter()
        outcome = distill(
            teacher,
            student,
            config,
            train_ids=train_ids,
            eval_ids=eval_ids,
            callbacks=Callbacks(metrics=_printer(name)),
        )
        facts = outcome.facts
        row = {
            "variant": name,
            "kl_weight": kl,
            "ce_weight": ce,
            "eval_ppl": facts["eval_perplexity_after"],
            "eval_ppl_before": facts["eval_perplexity_before"],
            "teacher_ppl": facts["teacher_eval_perplexity"],
            "tokens": facts["tokens"],
            "seconds": time.perf_counter() - start,
            "student_params": facts["student_params"],
            "teacher_params": facts["teacher_params"],
            "student_layers": facts["student_config"]["num_hidden_layers"],
        }
        results.append(row)
        print(f"{name}: eval ppl {row['eval_ppl']:.2f} ({row['seconds']:.0f} s)", flush=True)

    labels = results[0]["eval_ppl"]
    best_kd = min(r["eval_ppl"] for r in results[1:])
    gain = 1 - best_kd / labels
    teacher_ppl, before = results[0]["teacher_ppl"], results[0]["eval_ppl_before"]
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared), {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "temperature": args.temperature,
        "eval_tokens": int(eval_ids.numel()),
        "kd_gain_vs_labels": gain,
    }
    lines = [
        "## Distillation: KD vs labels at the same token budget",
        "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · `python -m bench.bench_distill`",
        "",
        f"Teacher `tiny-llama-man` ({results[0]['teacher_params'] / 1e6:.1f} M params, 6 layers); student = "
        f"{results[0]['student_layers']} of its layers, evenly spaced, cut from the teacher "
        f"({results[0]['student_params'] / 1e6:.1f} M params). Each run: {args.steps} steps x {args.batch_size} x "
        f"{args.seq_len} = {results[0]['tokens']:,} training tokens (train.txt), AdamW lr {args.lr}, warmup + cosine, "
        f"T = {args.temperature}, same batch order. Eval perplexity on the first {meta['eval_tokens']:,} tokens "
        "of eval.txt (never trained on).",
        "",
        "| model | eval ppl | wall s |",
        "|---|---:|---:|",
        f"| teacher (6 layers) | {teacher_ppl:.2f} | |",
        f"| student, cut, untrained | {before:.2f} | |",
        *(f"| student, {r['variant']} | {r['eval_ppl']:.2f} | {r['seconds']:.0f} |" for r in results),
        "",
        f"Best KD variant vs labels only: {gain * 100:.1f} % lower eval perplexity "
        f"({'meets' if gain >= 0.05 else 'misses'} the >= 5 % bar).",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
