"""GGUF benchmark (issue 22): ModelPress's GGUF exports against llama.cpp's own pipeline, on the
reference model, all scored by the same llama.cpp code (``workers.compression.llamacpp``) on the
same evaluation windows.

Files (``bench/.cache/gguf-bench/``; each made once, ``--fresh`` remakes them):

* ``mp-f16``: ModelPress's export of the float model (the F16 baseline every speed-up is against).
* ``mp-gptq-q4_0``: ModelPress GPTQ W4A16 g32 (symmetric, under ``gguf_exact_scales``), exported with
  ``type: auto``: the GPTQ codes carried into Q4_0 blocks; the tied embedding/output at Q8_0.
* ``mp-gptq-mixed``: the same GPTQ, but the Linears that llama.cpp's Q4_K_M keeps at 6 bits (attn_v
  and ffn_down of the ``use_more_bits`` layers) are left out of the quantize step (``ignore``) and
  exported at Q8_0 (``full_precision: "q8_0"``); everything else carries GPTQ's 4-bit codes.
* ``lc-f16``: llama.cpp's converter (``convert_hf_to_gguf.py --outtype f16``);
  ``lc-q4_0`` / ``lc-q4_k_m``: its quantizer (``llama-quantize``) from that file;
  ``lc-q4_k_m-imatrix``: the same with an importance matrix from ``llama-imatrix`` over the same
  calibration text (calib.txt, 32 chunks of 256 tokens, like ModelPress's 32 x 256 calibration).

Then: perplexity of every file from llama.cpp's logits, and prefill/decode tokens/s of all files
timed interleaved in the same rounds (median and min..max; wall and per process CPU-second).
Result: one JSON line in ``bench/results/gguf.jsonl`` and a markdown table on stdout.

Needs llama-cpp-python in the service venv and, for the llama.cpp side, the sources of the same
llama.cpp (``LLAMA_CPP_SRC``, default: the llama-cpp-python sdist unpacked in /tmp/lcpsrc) with its
``llama-quantize`` and ``llama-imatrix`` built against the wheel's libraries (``bench/build_llama_tools.sh``).

Usage: ``.venv/bin/python -m bench.gguf_bench [--fresh] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

OUT = common.CACHE / "gguf-bench"
TOOLS = common.CACHE / "llama-tools"
LLAMA_CPP_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/lcpsrc/llama_cpp_python-0.3.36/vendor/llama.cpp"))
GPTQ_G32 = {"scheme": "w4a16", "algorithm": "gptq", "group_size": 32}


def more_bits_layers(n_layers: int) -> list[int]:
    """The layers whose attn_v / ffn_down llama.cpp's Q4_K_M keeps at Q6_K (``use_more_bits`` in
    llama-quant.cpp): the first and last eighth, and every third layer in between."""
    return [i for i in range(n_layers) if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2]


def modelpress_files(fresh: bool, only: list[str] | None = None) -> dict[str, Any]:
    """The three ModelPress exports, and ModelPress's own (transformers) perplexity of each model."""
    import torch

    from app.jobs.spec import QuantizeStep
    from workers.compression.evaluate import perplexity
    from workers.compression.gguf import export_gguf
    from workers.compression.quantize import quantize
    from workers.compression.weight_quant import gguf_exact_scales

    tokenizer = common.load_tokenizer()
    calibration = common.calibration_ids(tokenizer)
    windows = common.eval_windows(common.eval_ids(tokenizer))
    facts: dict[str, Any] = {}
    n_layers = int(common.load_model().config.num_hidden_layers)
    keep = more_bits_layers(n_layers)
    recipes = {
        "mp-gptq-q4_0": (QuantizeStep(**GPTQ_G32), "llama.cpp"),
        "mp-gptq-mixed": (
            QuantizeStep(
                **GPTQ_G32,
                ignore=["lm_head"]
                + [f"model.layers.{i}.{m}" for i in keep for m in ("self_attn.v_proj", "mlp.down_proj")],
            ),
            "q8_0",
        ),
    }
    if fresh or not (OUT / "mp-f16.gguf").exists():
        model = common.load_model()
        facts["mp-f16"] = {"export": export_gguf(model, tokenizer, OUT / "mp-f16.gguf", "f16")}
        facts["mp-f16"]["transformers_ppl"] = perplexity(model, windows)
    for name, (step, policy) in recipes.items():
        if (not fresh and (OUT / f"{name}.gguf").exists()) or (only is not None and name not in only):
            continue
        model = common.load_model()
        started = time.perf_counter()
        with torch.no_grad(), gguf_exact_scales():
            quantize(model, step, calibration=calibration)
        seconds = time.perf_counter() - started
        partial = OUT / f"{name}.partial.gguf"  # another run may be waiting for the file: rename when whole
        export = export_gguf(model, tokenizer, partial, "q4_0", full_precision=policy)
        partial.rename(OUT / f"{name}.gguf")
        facts[name] = {
            "quantize_s": round(seconds, 1),
            "export": export,
            "transformers_ppl": perplexity(model, windows),
        }
        (OUT / f"{name}.json").write_text(json.dumps(facts[name], default=str))
    for name in recipes:
        if name not in facts and (OUT / f"{name}.json").exists():
            facts[name] = json.loads((OUT / f"{name}.json").read_text())
    return facts


def _run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        subprocess.run(["nice", *cmd], check=True, stdout=out, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - started, 1)


def llama_cpp_files(fresh: bool) -> dict[str, float]:
    """llama.cpp's own pipeline: converter to F16, quantizer to Q4_0 / Q4_K_M, imatrix + Q4_K_M."""
    log, seconds = OUT / "llama-cpp.log", {}
    f16 = OUT / "lc-f16.gguf"
    if fresh or not f16.exists():
        convert = [sys.executable, str(LLAMA_CPP_SRC / "convert_hf_to_gguf.py"), str(common.MODEL_DIR)]
        seconds["convert"] = _run([*convert, "--outtype", "f16", "--outfile", str(f16)], log)
    imatrix = OUT / "imatrix.gguf"
    if fresh or not imatrix.exists():
        seconds["imatrix"] = _run(
            [str(TOOLS / "llama-imatrix"), "-m", str(f16), "-f", str(common.CALIB_TXT), "-o", str(imatrix),
             "-c", str(common.CALIB_SEQ_LEN), "--chunks", str(common.CALIB_SAMPLES), "-t", str(common.THREADS)],
            log,
        )  # fmt: skip
    for name, kind, extra in (
        ("lc-q4_0", "Q4_0", []),
        ("lc-q4_k_m", "Q4_K_M", []),
        ("lc-q4_k_m-imatrix", "Q4_K_M", ["--imatrix", str(imatrix)]),
    ):
        target = OUT / f"{name}.gguf"
        if fresh or not target.exists():
            quantize = [str(TOOLS / "llama-quantize"), *extra, str(f16), str(target), kind, str(common.THREADS)]
            seconds[name] = _run(quantize, log)
    return seconds


def measure(files: list[str], rounds: int) -> dict[str, Any]:
    """Perplexity of every file from llama.cpp's logits, then all files timed interleaved."""
    from workers.compression.llamacpp import file_summary, gguf_perplexity, interleaved_speed, paired_speedup

    tokenizer = common.load_tokenizer()
    windows = common.eval_windows(common.eval_ids(tokenizer))
    ppl = {}
    for name in files:
        ppl[name] = gguf_perplexity(OUT / f"{name}.gguf", windows, threads=common.THREADS)
        print(f"{name}: llama.cpp ppl {ppl[name]:.4f}", flush=True)
    flat = windows.reshape(-1).tolist()
    timed = interleaved_speed(
        {name: OUT / f"{name}.gguf" for name in files}, flat[:128], flat[128:192],
        threads=common.THREADS, rounds=rounds,
    )  # fmt: skip
    out = {}
    for name in files:
        out[name] = file_summary(OUT / f"{name}.gguf", timed[name], ppl[name])
        for key in ("decode_tok_s", "prefill_tok_s", "decode_tok_per_cpu_s"):
            out[name][f"{key}_vs_f16"] = paired_speedup(timed[name], timed["mp-f16"], key)
    return {"files": out, "eval_windows": list(windows.shape), "rounds": rounds, "prefill": 128, "decode": 64}


def _span(values: dict[str, float], digits: int) -> str:
    return f"{values['median']:.{digits}f} ({values['min']:.{digits}f}..{values['max']:.{digits}f})"


def table(result: dict[str, Any]) -> str:
    """The markdown table of docs/bench/gguf.md: median (min..max over the interleaved rounds)."""
    files = result["files"]
    base = files["mp-f16"]["perplexity"]
    lines = [
        "| file | size MiB | llama.cpp ppl | vs F16 | prefill tok/s | decode tok/s | decode x F16 | "
        "decode per CPU-s x F16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in files.items():
        d = f["decode_tok_s_vs_f16"]
        flag = "" if d["significant"] or name == "mp-f16" else " n.s."
        lines.append(
            f"| {name} | {f['file_bytes'] / 2**20:.1f} | {f['perplexity']:.3f} "
            f"| {100 * (f['perplexity'] / base - 1):+.1f} % | {_span(f['prefill_tok_s'], 0)} "
            f"| {_span(f['decode_tok_s'], 0)} | {_span(d, 2)}{flag} | {_span(f['decode_tok_per_cpu_s_vs_f16'], 2)} |"
        )
    return "\n".join(lines)


def page(record: dict[str, Any]) -> str:
    """docs/bench/gguf.md: the table with the machine, load, date and what each line is."""
    mp = record["modelpress"]
    lines = [
        "## GGUF: ModelPress exports against llama.cpp's own pipeline (issue 22)",
        "",
        f"_Measured {record['time']} by `bench/gguf_bench.py` on {record['env']['cpu']} "
        f"(2 logical cores, shared); {record['env']['threads']} threads, batch 1; 1-minute load average "
        f"{record['load_avg_before'][0]:.1f} before, {record['load_avg'][0]:.1f} after._",
        "",
        f"Every file is scored by the same llama.cpp code (`workers.compression.llamacpp`): perplexity from "
        f"llama.cpp's logits over {record['eval_windows'][0]} x {record['eval_windows'][1]}-token windows of "
        f"eval.txt (the windows `bench.common.perplexity` uses); prefill {record['prefill']} tokens, then "
        f"{record['decode']} single-token decode steps, all files interleaved in the same {record['rounds']} "
        "rounds. Speeds: median (min..max over rounds); speed-ups are per-round paired ratios against "
        "`mp-f16`, `n.s.` where the range contains 1.0.",
        "",
        table(record),
        "",
        "- `mp-*`: ModelPress (`workers.compression.gguf.export_gguf`). `mp-gptq-q4_0`: GPTQ W4A16 g32 "
        "symmetric under `gguf_exact_scales()`, `type: auto` (the GPTQ codes carried into Q4_0; tied "
        "embedding/output Q8_0). `mp-gptq-mixed`: the same GPTQ, with attn_v and ffn_down of the layers "
        "where llama.cpp's Q4_K_M uses Q6_K left out of GPTQ and written Q8_0 (`full_precision: q8_0`).",
        "- `lc-*`: llama.cpp's converter (`convert_hf_to_gguf.py --outtype f16`) and `llama-quantize` "
        "(Q4_0, Q4_K_M; `-imatrix`: with `llama-imatrix` over calib.txt, 32 chunks x 256 tokens).",
    ]
    for name in ("mp-gptq-q4_0", "mp-gptq-mixed"):
        if name in mp and name in record["files"]:
            ours, theirs = mp[name]["transformers_ppl"], record["files"][name]["perplexity"]
            lines.append(
                f"- `{name}`: ModelPress's own (transformers) perplexity of the quantized model {ours:.3f}; "
                f"llama.cpp's of the file {theirs:.3f} ({100 * (theirs / ours - 1):+.2f} %)."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="remake every file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report", action="store_true", help="only re-render docs/bench/gguf.md from the last result")
    parser.add_argument("--make", nargs="+", help="only make these ModelPress files, no measurement")
    parser.add_argument("--measure", action="store_true", help="only measure the files already made")
    args = parser.parse_args()
    doc = common.ROOT / "docs" / "bench" / "gguf.md"
    if args.report:
        last = (common.RESULTS / "gguf.jsonl").read_text(encoding="utf-8").splitlines()[-1]
        doc.write_text(page(json.loads(last)), encoding="utf-8")
        return
    common.limit_threads()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.make:
        print(json.dumps(modelpress_files(args.fresh, only=args.make), default=str))
        return
    load_before = common.load_avg()
    started = time.perf_counter()
    modelpress = modelpress_files(args.fresh, only=[] if args.measure else None)
    pipeline_s = {} if args.measure else llama_cpp_files(args.fresh)
    files = ["mp-f16", "mp-gptq-q4_0", "mp-gptq-mixed", "lc-f16", "lc-q4_0", "lc-q4_k_m", "lc-q4_k_m-imatrix"]
    files = [name for name in files if (OUT / f"{name}.gguf").exists()]
    result = measure(files, args.rounds)
    record = {
        "bench": "gguf",
        "env": common.environment(),
        "load_avg_before": load_before,
        "modelpress": modelpress,
        "llama_cpp_pipeline_s": pipeline_s,
        **result,
        "total_s": round(time.perf_counter() - started, 1),
    }
    common.write_result("gguf.jsonl", record)
    last = (common.RESULTS / "gguf.jsonl").read_text(encoding="utf-8").splitlines()[-1]
    doc.write_text(page(json.loads(last)), encoding="utf-8")
    print(table(result))


if __name__ == "__main__":
    main()
