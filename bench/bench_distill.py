"""Distillation benchmark: does the teacher's signal beat plain labels at the same token budget?

Two teachers (``--teacher``):

* ``tiny-llama-man`` (default): the undertrained 6-layer Llama in /work/shared/models/, trained on its
  own ``train.txt`` and scored on its ``eval.txt``.
* ``smollm2-135m``: the reference model of the quantization benchmark (SmolLM2-135M-Instruct, float32,
  ``bench/.cache/smollm2-135m``, made by ``bench.reference_model``), trained on ``bench/.cache/calib.txt``
  and scored on ``bench/.cache/eval.txt``: disjoint halves of ``pydoc_data.topics`` (``bench.corpus``).

Student: half the teacher's layers (``from_teacher.keep_ratio = 0.5``), cut from the teacher and
initialised from its weights. Three runs with the same steps, batch, data order, learning rate and
schedule; only the loss weights differ: CE only (labels), KD only, KD + CE. Prints eval perplexity of
each, of the teacher and of the cut student before training. Results are kept per teacher (per
``--label``) in ``bench/results/distill.json``; ``docs/bench/distill.md`` is rendered from all of them
(copy it into the distillation section of ``docs/BENCHMARKS.md``).

    .venv/bin/python -m bench.bench_distill                         # tiny-llama-man, ~3 min per run
    .venv/bin/python -m bench.bench_distill --teacher smollm2-135m  # ~5 min per run on 1 thread
    .venv/bin/python -m bench.bench_distill --steps 2 --no-write    # smoke run
    .venv/bin/python -m bench.bench_distill --render                # re-render the doc from the JSON only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CALIB_TXT, EVAL_TXT, MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bench" / "distill.md"
RESULT = ROOT / "bench" / "results" / "distill.json"

VARIANTS = {  # name -> (kl_weight, ce_weight)
    "CE only (labels)": (0.0, 1.0),
    "KD only": (1.0, 0.0),
    "KD + CE": (1.0, 0.5),
}


@dataclass(frozen=True)
class Teacher:
    """One benchmark setting: the teacher, its train/eval text, and the default loop size for it."""

    name: str
    model_dir: Path
    train_txt: Path
    eval_txt: Path
    description: str  # one line for the report: what the model and the text are
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    eval_windows: int  # eval.txt windows of seq_len tokens
    cut: str  # how the half of the layers is chosen: "even" or "shortgpt"


TINY_DIR = Path("/work/shared/models/tiny-llama-man")
TEACHERS = {
    "tiny-llama-man": Teacher(
        name="tiny-llama-man",
        model_dir=TINY_DIR,
        train_txt=TINY_DIR / "train.txt",
        eval_txt=TINY_DIR / "eval.txt",
        description="the undertrained 6-layer Llama in `/work/shared/models/`; its own train.txt / eval.txt",
        steps=36,
        batch_size=8,
        seq_len=256,
        lr=1e-3,
        eval_windows=40,
        cut="even",
    ),
    "smollm2-135m": Teacher(
        name="smollm2-135m",
        model_dir=MODEL_DIR,
        train_txt=CALIB_TXT,
        eval_txt=EVAL_TXT,
        description=(
            "SmolLM2-135M-Instruct in float32 (the quantization benchmark's reference model, dequantized from "
            "its Q4_1 GGUF); trained on `bench/.cache/calib.txt`, scored on `bench/.cache/eval.txt` "
            "(disjoint halves of `pydoc_data.topics`, see `bench/corpus.py`)"
        ),
        steps=16,
        batch_size=4,
        seq_len=256,
        lr=3e-4,
        eval_windows=16,
        cut="even",
    ),
}

# Prose kept under a teacher's table: observations from runs that the JSON does not hold.
NOTES = {
    "tiny-llama-man": (
        "Sensitivity check, same budget at lr 3e-4 (`--lr 3e-4`): CE only 241.78, KD only 212.32, KD + CE 220.14\n"
        "(KD 12.2 % better). At lr 1e-3 labels alone push the freshly cut student *above* its untrained perplexity in\n"
        "36 steps, while KD keeps improving it; at the gentler rate all three improve and KD still wins clearly.\n"
        "Budget is tiny (74k tokens, CPU, machine shared with other jobs), so read these as direction, not final "
        "numbers."
    ),
    "smollm2-135m": (
        "**On SmolLM2 the >= 5 % bar is met at two epochs, on both seeds tried (+17.7 %, +18.0 %)** (issue 4, "
        "Done-when 2). Runs in the order made; everything after the first was a reaction to the previous result, "
        "chosen before seeing the next, and every run is kept. (1) Defaults: the evenly spaced cut leaves SmolLM2 "
        "broken (untrained ppl ~1.2 M); KD + CE is 4.8 % better than labels, KD alone 15 % worse. (2) A sane "
        "student (ShortGPT cut, untrained 12 k) at T = 2: labels win (KD alone 27 % worse). (3) T = 1 (forward KL "
        "= cross-entropy against the teacher's whole distribution, the usual choice for LLM distillation): KD "
        "alone draws level (+1.0 %), KD + CE +4.2 %. (4) Three times the budget (48 steps, one pass over "
        "calib.txt): labels 61.2, KD 65.1, KD + CE 59.5 (+2.9 %). (5) The same with hidden-state matching for the "
        "KD variants (`--hidden-weight 0.001`: SmolLM2's residual stream jumps to RMS ~62 after layer 17, so raw "
        "MSE starts near 2,700 against a KL of ~7): KD + CE 58.5 (+4.5 %). (6) The learning rate had never been "
        "swept; at 1e-3 (the tiny teacher's) all three improve a lot: labels 42.8, KD 45.6, KD + CE 40.5 (**+5.3 "
        "%**). (7) The same with data-order seed 1: labels 47.2, KD 50.7, KD + CE 45.3 (+4.0 %). (8) Two epochs "
        "over the training half (96 steps), otherwise as (6): labels 35.9, KD 35.9, KD + CE 29.5 (**+17.7 %**). "
        "(9) The same with seed 1: labels 36.1, KD 36.8, KD + CE 29.6 (**+18.0 %**). Reading: at T = 1 KD + CE "
        "beats labels in every SmolLM2 run with a sane student. Within one pass over the 48 k training tokens the "
        "gap is +2.9 to +5.3 % (one pass at lr 1e-3: +5.3 % and +4.0 % on two seeds); in the second epoch labels "
        "alone start to fit the training text while the teacher's distribution keeps the student general, and the "
        "gap opens to ~18 % on both seeds. KD alone trails or ties labels on this in-domain text. Untested: T "
        "between 1 and 2, budgets beyond two epochs (a GPU job), more seeds."
    ),
}


def cpu_model() -> str:
    """``lscpu`` model name (the machine line of the report)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def _printer(name: str, every: int) -> Callable[[dict[str, Any]], None]:
    """A metrics sink that prints every ``every``-th step, so a slow run shows it is alive."""

    def show(metrics: dict[str, Any]) -> None:
        if metrics["step"] % every == 0:
            print(f"  [{name}] step {metrics['step']} loss {metrics['train_loss']:.3f}", flush=True)

    return show


# ---------------------------------------------------------------------------- results file


def load_results() -> dict[str, dict[str, Any]]:
    """``label -> {"meta", "results"}``. A file in the old one-teacher layout is the tiny-llama run."""
    if not RESULT.is_file():
        return {}
    data = json.loads(RESULT.read_text())
    if "meta" in data and "results" in data:
        return {"tiny-llama-man": data}
    return data  # type: ignore[no-any-return]


def _ppl(results: list[dict[str, Any]], variant: str) -> float | None:
    return next((r["eval_ppl"] for r in results if r["variant"] == variant), None)


def _flags(command: str) -> str:
    """The run's flags minus ``--teacher`` (the section says it) and ``--label`` (storage only)."""
    words = shlex.split(command)[3:]
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--teacher", "--label"):
            skip = True
        else:
            kept.append(word)
    return " ".join(kept) or "(defaults)"


def render(all_results: dict[str, dict[str, Any]]) -> str:
    """The markdown report: per teacher, one row per stored run (a run = the three variants)."""
    lines = [
        "## Distillation: KD vs labels at the same token budget",
        "",
        "`python -m bench.bench_distill [--teacher NAME]`. Student = half the teacher's layers, cut from the teacher "
        "and initialised from its weights (evenly spaced, or ranked by ShortGPT block influence on the first 8 "
        "training blocks, as a job with calibration text does). Within a run the three variants share steps, batch, "
        "data order, learning rate, warmup + cosine schedule (to 10 %), temperature and seed; only the loss weights "
        "differ (CE only: kl 0 / ce 1; KD only: kl 1 / ce 0; KD + CE: kl 1 / ce 0.5; with `--hidden-weight W` the two "
        "KD variants also match hidden states, MSE x W, student layer i against the teacher's output just before the "
        "next layer the student kept). Eval text is never trained "
        "on. Wall seconds include each variant's teacher / untrained / final evaluations. "
        "Raw numbers: `bench/results/distill.json`.",
        "",
    ]
    by_teacher: dict[str, list[dict[str, Any]]] = {}
    for label, run in all_results.items():
        by_teacher.setdefault(run["meta"].get("teacher", label), []).append(run)
    for name, runs in by_teacher.items():
        teacher = TEACHERS.get(name)
        meta0, first = runs[0]["meta"], runs[0]["results"][0]
        lines += [
            f"### Teacher `{name}`",
            "",
            f"{teacher.description if teacher else name}. Teacher {first['teacher_params'] / 1e6:.1f} M params, "
            f"student {first['student_layers']} layers / {first['student_params'] / 1e6:.1f} M params. "
            f"{meta0['date']} · {meta0['machine']} · torch {meta0['torch']}. "
            f"Eval perplexity on the first {meta0['eval_tokens']:,} tokens of the eval text; "
            f"teacher: **{first['teacher_ppl']:.2f}**.",
            "",
            "| run (command flags) | cut | T | lr | tokens per variant | untrained | CE only | KD only | KD + CE "
            "| best KD vs CE | wall s (CE / KD / KD+CE) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in runs:
            meta, results = run["meta"], run["results"]
            ce, kd, both = (_ppl(results, v) for v in VARIANTS)
            best = min(x for x in (kd, both) if x is not None)
            gain = 1 - best / ce if ce else float("nan")
            flags = _flags(meta.get("command", ""))
            budget = f"{meta['steps']} x {meta['batch_size']} x {meta['seq_len']} = {results[0]['tokens']:,}"
            walls = " / ".join(f"{r['seconds']:.0f}" for r in results)
            lines.append(
                f"| `{flags}` | {meta.get('cut', 'even')} | {meta['temperature']:g} | {meta['lr']:g} | {budget} "
                f"| {results[0]['eval_ppl_before']:.0f} | {ce:.2f} | {kd:.2f} | {both:.2f} "
                f"| {gain * 100:+.1f} % {'✓' if gain >= 0.05 else '✗'} | {walls} |"
            )
        lines.append("")
        if name in NOTES:
            lines += [NOTES[name], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="tiny-llama-man")
    parser.add_argument("--label", help="key of this run in distill.json (default: the teacher's name)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--eval-windows", type=int, help="eval text windows of seq_len tokens")
    parser.add_argument("--cut", choices=["even", "shortgpt"], help="which half of the layers the student keeps")
    parser.add_argument(
        "--hidden-weight",
        type=float,
        help="KD variants also match hidden states (MSE, this weight): student layer i's output against the "
        "teacher's output just before the next layer the student kept",
    )
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")), help="1 suits a shared machine"
    )
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisations, shared by the variants")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--render", action="store_true", help="only re-render docs/bench/distill.md from the JSON")
    args = parser.parse_args()
    if args.render:
        DOC.write_text(render(load_results()))
        return
    setup = TEACHERS[args.teacher]
    steps = args.steps or setup.steps
    batch_size = args.batch_size or setup.batch_size
    seq_len = args.seq_len or setup.seq_len
    lr = args.lr or setup.lr
    eval_windows = args.eval_windows or setup.eval_windows
    cut = args.cut or setup.cut

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.common import limit_threads
    from workers.compression.base import Callbacks
    from workers.compression.data import tokenize_stream
    from workers.compression.distill import build_student, distill, teacher_layers_kept
    from workers.compression.recipe import DistillStep, StudentSpec

    limit_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).eval()
    budget = steps * batch_size * seq_len
    # read only as much training text as the budget needs (~4 bytes a token, with margin)
    train_text = setup.train_txt.read_text(encoding="utf-8")[: budget * 6]
    train_ids = tokenize_stream(tokenizer, [train_text])
    eval_text = setup.eval_txt.read_text(encoding="utf-8")
    eval_ids = tokenize_stream(tokenizer, [eval_text])[: eval_windows * seq_len]
    spec = StudentSpec(from_teacher={"keep_ratio": 0.5})
    # ShortGPT ranks layers on the first training blocks (never the eval text), as a job with calibration does
    calibration = train_ids[: 8 * seq_len].view(8, seq_len) if cut == "shortgpt" else None

    hidden = None
    if args.hidden_weight:
        kept = teacher_layers_kept(teacher, spec.from_teacher, calibration=calibration)  # type: ignore[arg-type]
        assert kept is not None
        # the student's layer i stands in for teacher layers kept[i] .. kept[i + 1] - 1
        ends = [nxt - 1 for nxt in kept[1:]] + [len(teacher.model.layers) - 1]
        hidden = {"layer_map": [[i, end] for i, end in enumerate(ends)], "weight": args.hidden_weight}

    results: list[dict[str, Any]] = []
    for name, (kl, ce) in VARIANTS.items():
        config = DistillStep(
            student=spec,
            kl_weight=kl,
            ce_weight=ce,
            temperature=args.temperature,
            max_steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            learning_rate=lr,
            hidden_states=hidden if kl > 0 else None,
            seed=args.seed,
            warmup_steps=max(1, steps // 20),
            eval_every=10**6,
            checkpoint_every=10**6,
        )
        start = time.perf_counter()
        student = build_student(teacher, spec, calibration=calibration)
        outcome = distill(
            teacher,
            student,
            config,
            train_ids=train_ids,
            eval_ids=eval_ids,
            callbacks=Callbacks(metrics=_printer(name, max(1, steps // 8))),
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

    gain = 1 - min(r["eval_ppl"] for r in results[1:]) / results[0]["eval_ppl"]
    command = shlex.join(["python", "-m", "bench.bench_distill", *sys.argv[1:]])
    meta = {
        "teacher": setup.name,
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared), {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "command": command,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "temperature": args.temperature,
        "cut": cut,
        "hidden_weight": args.hidden_weight,
        "seed": args.seed,
        "eval_tokens": int(eval_ids.numel()),
        "kd_gain_vs_labels": gain,
    }
    label = args.label or setup.name
    all_results = {**load_results(), label: {"meta": meta, "results": results}}
    text = render({label: all_results[label]})  # this run alone, for the console
    print("\n" + text)
    if not args.no_write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(all_results, indent=2) + "\n")
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(render(all_results))


if __name__ == "__main__":
    main()
