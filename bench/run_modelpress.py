"""The ModelPress side of the comparison (runs in the service venv, /work/main/.venv).

Same recipes, same calibration tokens, same perplexity function as bench/run_llmcompressor.py,
through ModelPress's engines (``workers.compression.quantize.quantize`` and
``workers.compression.prune.prune``). Every recipe runs in a fresh child process so its peak RSS is
its own; ``wall_s`` is the engine call alone (not model loading, not tokenising the calibration
text, not evaluation). Results: ``bench/results/modelpress.jsonl``.

Structured pruning (``struct_*``) is also scored on the reference model (parameters + perplexity),
and ``speed`` measures CPU prefill/decode tokens/s at batch 1 before/after structured pruning on a
random-weight ~110M-parameter Llama (``bench/results/speed.jsonl``).

Usage: ``.venv/bin/python -m bench.run_modelpress [recipe ...]`` (default: all, then ``speed``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

RESULT_FILE = "modelpress.jsonl"
SPEED_FILE = "speed.jsonl"

# name -> (kind, step as dict, description); names match bench/run_llmcompressor.py.
RECIPES: dict[str, tuple[str, dict[str, Any] | None, str]] = {
    "baseline": ("none", None, "float32 reference (dequantized Q4_1 GGUF)"),
    "w8a16_rtn": ("quant", {"scheme": "w8a16"}, "int8 weights per channel, symmetric, RTN"),
    "w4a16_rtn_g64": ("quant", {"scheme": "w4a16", "group_size": 64}, "int4 weights, groups of 64, symmetric, RTN"),
    "w4a16_gptq_g64": (
        "quant",
        {"scheme": "w4a16", "group_size": 64, "algorithm": "gptq", "dampening_frac": 0.01, "block_size": 128},
        "int4 weights, groups of 64, symmetric, GPTQ (damp 0.01, block 128)",
    ),
    "w8a8_sq": (
        "quant",
        {"scheme": "w8a8", "activations": "dynamic", "smoothquant": {"alpha": 0.5}},
        "int8 weights per channel + int8 dynamic per-token activations, SmoothQuant a=0.5",
    ),
    "fp8_dynamic": ("quant", {"scheme": "fp8"}, "fp8 e4m3 weights per channel + dynamic per-token activations"),
    "prune_magnitude_50": ("prune", {"algorithm": "magnitude", "sparsity": 0.5}, "unstructured 50 % by |w| per layer"),
    "prune_wanda_50": ("prune", {"algorithm": "wanda", "sparsity": 0.5}, "unstructured 50 %, Wanda |w|*||x||"),
    "prune_sparsegpt_50": (
        "prune",
        {"algorithm": "sparsegpt", "sparsity": 0.5, "dampening_frac": 0.01, "block_size": 128},
        "unstructured 50 %, SparseGPT (damp 0.01, block 128)",
    ),
    "prune_sparsegpt_2of4": (
        "prune",
        {"algorithm": "sparsegpt", "pattern": "2:4", "dampening_frac": 0.01, "block_size": 128},
        "2:4 semi-structured, SparseGPT",
    ),
    "struct_heads25_mlp25": (
        "structured",
        {"algorithm": "structured", "targets": {"heads": 0.25, "mlp": 0.25}},
        "drop 25 % of attention head groups and 25 % of MLP channels in every layer",
    ),
    "struct_layers33": (
        "structured",
        {"algorithm": "structured", "targets": {"layers": 1 / 3}},
        "drop 1/3 of decoder layers, least important first (issue: '2 of 6'; here 10 of 30)",
    ),
}

# The speed model: Llama family, ~110M parameters, big enough that matmuls dominate Python overhead.
SPEED_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,  # head_dim 48; 12 of 16 heads keeps hidden % heads == 0 (Llama validates it)
    "num_key_value_heads": 4,
    "intermediate_size": 2048,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
SPEED_VARIANTS: dict[str, dict[str, float] | None] = {
    "dense": None,
    "heads25_mlp25": {"heads": 0.25, "mlp": 0.25},
    "layers33": {"layers": 1 / 3},
}
PREFILL_TOKENS = 512
DECODE_PROMPT = 64
DECODE_TOKENS = 64
SPEED_RUNS = 3


def _step(kind: str, spec: dict[str, Any]) -> Any:
    from app.jobs.spec import PruneStep, QuantizeStep

    return QuantizeStep(**spec) if kind == "quant" else PruneStep(**spec)


def run_one(name: str) -> None:
    """Run one recipe on the reference model in this process and write its result line."""
    common.limit_threads()
    from workers.compression.base import Callbacks
    from workers.compression.data import calibration_blocks

    kind, spec, description = RECIPES[name]
    tokenizer = common.load_tokenizer()
    model = common.load_model()
    stream = common.eval_ids(tokenizer)
    ids = calibration_blocks(tokenizer, [common.CALIB_TXT], common.CALIB_SEQ_LEN, common.CALIB_SAMPLES)
    shared = common.calibration_ids(tokenizer)
    if common.ids_digest(ids) != common.ids_digest(shared):
        raise RuntimeError("workers.compression.data.calibration_blocks disagrees with bench.common.calibration_ids")
    record: dict[str, Any] = {
        "tool": "modelpress",
        "recipe": name,
        "kind": kind,
        "description": description,
        "calib_digest": common.ids_digest(ids),
        "eval_digest": common.ids_digest(stream),
        **common.environment(),
    }
    params_before = common.count_params(model)
    if spec is not None:
        step = _step("quant" if kind == "quant" else "prune", spec)
        needs = step.needs_calibration
        record["calib"] = f"{ids.shape[0]}x{ids.shape[1]}" if needs else "none"
        calibration = ids if needs else None
        if kind == "quant":
            from workers.compression.quantize import quantize as engine
        else:
            from workers.compression.prune import prune as engine
        with common.measure() as timing:
            outcome = engine(model, step, calibration=calibration, callbacks=Callbacks())
        model = outcome.model
        record.update(
            wall_s=round(timing.wall_s, 2),
            cpu_s=round(timing.cpu_s, 2),
            rss_before_mib=round(timing.rss_before_mib, 1),
            peak_rss_mib=round(timing.peak_rss_mib, 1),
            facts={k: v for k, v in outcome.facts.items() if _small(v)},
        )
    else:
        record.update(rss_before_mib=round(common.rss_mib(), 1), peak_rss_mib=round(common.peak_rss_mib(), 1))
    model.eval()
    record["sparsity"] = round(common.sparsity_of(model), 4)
    record["params_before"] = params_before
    record["params"] = common.count_params(model)
    record.update(common.perplexity(model, stream))
    common.write_result(RESULT_FILE, record)


def _small(value: Any) -> bool:
    """Keep scalar/short facts in the JSON line (per-module error maps are long)."""
    if isinstance(value, dict):
        return len(value) <= 8
    if isinstance(value, list):
        return len(value) <= 40
    return True


def _speed_model(seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SPEED_CONFIG))
    return model.to(torch.float32).eval()


def _tokens_per_second(model: Any) -> dict[str, float]:
    """Median prefill and decode tokens/s at batch 1 (one warm-up discarded)."""
    import torch

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, PREFILL_TOKENS), generator=gen)
    short = torch.randint(0, vocab, (1, DECODE_PROMPT), generator=gen)
    prefill: list[float] = []
    decode: list[float] = []
    with torch.no_grad():
        for run in range(SPEED_RUNS + 1):
            t0 = time.perf_counter()
            model(input_ids=prompt, use_cache=False)
            t_prefill = time.perf_counter() - t0
            out = model(input_ids=short, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t_decode = time.perf_counter() - t0
            if run:  # run 0 is the warm-up
                prefill.append(PREFILL_TOKENS / t_prefill)
                decode.append(DECODE_TOKENS / t_decode)
    return {
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "decode_tok_s": round(statistics.median(decode), 2),
        "prefill_runs": [round(x, 1) for x in prefill],
        "decode_runs": [round(x, 2) for x in decode],
    }


def run_speed() -> None:
    """Prefill/decode tokens/s of the random ~110M Llama, dense and after each structured recipe."""
    common.limit_threads()
    import torch

    from app.jobs.spec import PruneStep
    from workers.compression.base import Callbacks
    from workers.compression.prune import prune

    base = _speed_model()
    calibration = torch.randint(0, SPEED_CONFIG["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(2))
    for variant, targets in SPEED_VARIANTS.items():
        model = base if targets is None else copy.deepcopy(base)
        wall = None
        if targets is not None:
            t0 = time.perf_counter()
            model = prune(model, PruneStep(algorithm="structured", targets=targets), calibration=calibration,
                          callbacks=Callbacks()).model
            wall = round(time.perf_counter() - t0, 2)
        cfg = model.config
        record = {
            "tool": "modelpress",
            "variant": variant,
            "targets": targets,
            "prune_wall_s": wall,
            "params": common.count_params(model),
            "layers": cfg.num_hidden_layers if targets is None else len(model.model.layers),
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size,
            "prefill_tokens": PREFILL_TOKENS,
            "decode_tokens": DECODE_TOKENS,
            **_tokens_per_second(model),
            **common.environment(),
        }
        common.write_result(SPEED_FILE, record)


def main() -> None:
    """Run the named recipes (default all + speed), one fresh process each, one at a time."""
    choices = [*RECIPES, "speed"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help=f"any of {', '.join(choices)} (default: all)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.recipes = args.recipes or choices
    unknown = [r for r in args.recipes if r not in choices]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {choices}")
    if args.child:
        run_speed() if args.recipes[0] == "speed" else run_one(args.recipes[0])
        return
    failed = []
    for name in args.recipes:
        print(f"== modelpress {name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.run_modelpress", "--child", name], cwd=common.ROOT)
        if proc.returncode != 0:
            failed.append(name)
            target = SPEED_FILE if name == "speed" else RESULT_FILE
            common.write_result(target, {"tool": "modelpress", "recipe": name, "error": f"exit {proc.returncode}"})
    if failed:
        print(f"failed: {failed}", file=sys.stderr)


if __name__ == "__main__":
    main()
