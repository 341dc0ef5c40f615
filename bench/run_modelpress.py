"""The ModelPress side of the comparison (runs in the service venv, /work/main/.venv).

Same recipes, same calibration tokens, same perplexity function as bench/run_llmcompressor.py,
through ModelPress's engines (``workers.compression.quantize.quantize`` and
``workers.compression.prune.prune``). Every recipe runs in a fresh child process so its peak RSS is
its own; ``wall_s`` is the engine call alone (not model loading, not tokenising the calibration
text, not evaluation). Results: ``bench/results/modelpress.jsonl``.

Structured pruning (``struct_*``) is also scored on the reference model (parameters + perplexity),
and ``speed`` measures CPU prefill/decode tokens/s at batch 1 before/after structured pruning on a
random-weight Llama of SmolLM2-135M's shape (``bench/results/speed.jsonl``).

Usage: ``.venv/bin/python -m bench.run_modelpress [recipe ...]`` (default: all, then ``speed``).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

RESULT_FILE = "modelpress.jsonl"
SPEED_FILE = "speed.jsonl"

# The GPTQ W4A16 g64 recipe both tools run; variants below change one option of it.
GPTQ_G64: dict[str, Any] = {
    "scheme": "w4a16",
    "group_size": 64,
    "algorithm": "gptq",
    "dampening_frac": 0.01,
    "block_size": 128,
}

# name -> (kind, step as dict, description); names match bench/run_llmcompressor.py.
RECIPES: dict[str, tuple[str, dict[str, Any] | None, str]] = {
    "baseline": ("none", None, "float32 reference (dequantized Q4_1 GGUF)"),
    "w8a16_rtn": ("quant", {"scheme": "w8a16"}, "int8 weights per channel, symmetric, RTN"),
    "w4a16_rtn_g64": ("quant", {"scheme": "w4a16", "group_size": 64}, "int4 weights, groups of 64, symmetric, RTN"),
    "w4a16_gptq_g64": (
        "quant",
        GPTQ_G64,
        "int4 weights, groups of 64, symmetric, GPTQ (damp 0.01, block 128, act-order with static groups: "
        "the default of both tools)",
    ),
    "w4a16_gptq_g64_10m": (
        "quant",
        GPTQ_G64,
        "w4a16_gptq_g64 on a 10M-parameter 4-layer Llama (random weights: time only)",
    ),
    "w4a16_gptq_g64_lazy": (
        "quant",
        {**GPTQ_G64, "act_order": False},
        "as w4a16_gptq_g64 without act-order: columns in order, group scales from the updated weights",
    ),
    "w4a16_gptq_g64_minmax": (
        "quant",
        {**GPTQ_G64, "clip_search": False},
        "as w4a16_gptq_g64 with plain min/max static group scales (clip_search off, llm-compressor's way)",
    ),
    "w4a16_gptq_g64_lowmem": (
        "quant_stream",
        {**GPTQ_G64, "act_order": True},
        "w4a16_gptq_g64 in low-memory mode: layers streamed from the shards, never the whole model "
        "in memory; wall/RSS include writing the checkpoint, ppl is scored in the same pass",
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
        "drop 25 % of attention heads (nearest valid on SmolLM2: 1 of 3 GQA groups = 33 %) and 25 % of MLP "
        "channels in every layer",
    ),
    "struct_layers33": (
        "structured",
        {"algorithm": "structured", "targets": {"layers": 1 / 3}},
        "drop 1/3 of decoder layers, least important first (issue: '2 of 6'; here 10 of 30)",
    ),
}

# The speed model: SmolLM2-135M's own shape (the reference model's config) with random weights, so
# the speed rows and the perplexity rows describe the same architecture. fp32 decode at batch 1 reads
# every Linear weight once per token (538 MB here), which is ~82 % of a decode step on this CPU;
# the tied 49152 x 576 lm_head is 21 % of those bytes and is not pruned.
SPEED_CONFIG: dict[str, Any] = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
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
SPEED_RUNS = 7
# One thread by default: on a 2-core machine that other work shares, a 2-thread decode step waits a
# scheduler slice at every OpenMP barrier whenever a co-tenant holds a core (measured: 250 ms/token
# at 2 threads vs 58 ms at 1), i.e. it times the neighbours, not the model.
SPEED_THREADS = int(os.environ.get("BENCH_SPEED_THREADS", "1"))


def _step(kind: str, spec: dict[str, Any]) -> Any:
    from workers.compression.recipe import PruneStep, QuantizeStep

    return QuantizeStep(**spec) if kind == "quant" else PruneStep(**spec)


def run_one(name: str) -> None:
    """Run one recipe on the reference model in this process and write its result line."""
    common.limit_threads()
    from workers.compression.base import Callbacks
    from workers.compression.data import calibration_blocks

    kind, spec, _description = RECIPES[name]
    if kind == "quant_stream":
        _run_streaming(name)
        return
    tokenizer = common.load_tokenizer()
    model = common.load_model(common.model_dir_for(name))
    stream = common.eval_ids(tokenizer)
    ids = calibration_blocks(tokenizer, [common.CALIB_TXT], common.CALIB_SEQ_LEN, common.CALIB_SAMPLES)
    shared = common.calibration_ids(tokenizer)
    if common.ids_digest(ids) != common.ids_digest(shared):
        raise RuntimeError("workers.compression.data.calibration_blocks disagrees with bench.common.calibration_ids")
    record = _record_head(name, ids, stream)
    params_before = common.count_params(model)
    if spec is not None:
        step = _step("quant" if kind == "quant" else "prune", spec)
        needs = step.calibration_reason is not None
        record["calib"] = f"{ids.shape[0]}x{ids.shape[1]}" if needs else "none"
        calibration = ids if needs else None
        if kind == "quant":
            from workers.compression.quantize import quantize as engine
        else:
            from workers.compression.prune import prune as engine
        with common.measure(matmul_rate=name in common.FLOOR_RECIPES) as timing:
            outcome = engine(model, step, calibration=calibration, callbacks=Callbacks())
        model = outcome.model
        record.update(
            **timing.fields(),
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


def _record_head(name: str, ids: Any, stream: Any) -> dict[str, Any]:
    """The fields every ModelPress result line starts with."""
    kind, _spec, description = RECIPES[name]
    return {
        "tool": "modelpress",
        "recipe": name,
        "kind": kind,
        "description": description,
        "calib_digest": common.ids_digest(ids),
        "eval_digest": common.ids_digest(stream),
        **common.environment(),
    }


def _run_streaming(name: str) -> None:
    """A low-memory recipe: the model is never loaded; the engine reads, quantizes and writes layer by layer."""
    import tempfile

    from workers.compression.data import calibration_blocks
    from workers.compression.streaming import quantize_streaming

    spec = RECIPES[name][1]
    assert spec is not None
    tokenizer = common.load_tokenizer()
    stream = common.eval_ids(tokenizer)
    ids = calibration_blocks(tokenizer, [common.CALIB_TXT], common.CALIB_SEQ_LEN, common.CALIB_SAMPLES)
    windows = common.eval_windows(stream)
    step = _step("quant", spec)
    with tempfile.TemporaryDirectory() as out, common.measure() as timing:
        outcome, result = quantize_streaming(common.MODEL_DIR, step, Path(out), calibration=ids, eval_ids=windows)
    record = _record_head(name, ids, stream) | {
        "calib": f"{ids.shape[0]}x{ids.shape[1]}",
        "wall_s": round(timing.wall_s, 2),
        "cpu_s": round(timing.cpu_s, 2),
        "rss_before_mib": round(timing.rss_before_mib, 1),
        "peak_rss_mib": round(timing.peak_rss_mib, 1),
        "model_float32_mib": round(outcome.facts["checkpoint_float32_bytes"] / 2**20, 1),
        "facts": {k: v for k, v in outcome.facts.items() if _small(v)},
        "ppl": result.perplexity_after,
        "ppl_before": result.perplexity_before,
        "eval_tokens": int(windows.numel()),
        "eval_windows": int(windows.shape[0]),
    }
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


def _weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode token reads: every parameter once, except that an untied input
    embedding contributes only the looked-up row (a tied one is read whole by lm_head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed is not head:
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    return total


def _prefill_flops(model: Any, tokens: int = PREFILL_TOKENS) -> int:
    """Matmul FLOPs of one forward over ``tokens`` (all Linear layers incl. lm_head on every position,
    plus causal QKᵀ and AV)."""
    from torch import nn

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    attention = len(model.model.layers) * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * tokens * (tokens + 1) // 2
    return 2 * tokens * linear + attention


def _measure_once(model: Any, prompt: Any, short: Any) -> tuple[float, float, float, float]:
    """One prefill and one decode of exactly ``DECODE_TOKENS`` greedy tokens (no EOS stop): wall and CPU s."""
    import torch

    with torch.inference_mode():  # as a server runs it: no autograd bookkeeping
        w0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=prompt, use_cache=False)
        prefill = (time.perf_counter() - w0, time.process_time() - c0)
        out = model(input_ids=short, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(DECODE_TOKENS):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - w0, time.process_time() - c0)
    return prefill[0], prefill[1], decode[0], decode[1]


def _tokens_per_second(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median prefill/decode tokens/s per model at batch 1, interleaved: every round measures every
    model (in a rotating order) on the same prompts, so load changes hit all of them alike. Round 0
    is a warm-up. Wall-clock and process-CPU rates are both kept (CPU time ignores preemption)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SPEED_CONFIG["vocab_size"], (1, PREFILL_TOKENS), generator=gen)
    short = torch.randint(0, SPEED_CONFIG["vocab_size"], (1, DECODE_PROMPT), generator=gen)
    names = list(models)
    runs: dict[str, dict[str, list[float]]] = {
        n: {"prefill": [], "prefill_cpu": [], "decode": [], "decode_cpu": []} for n in names
    }
    for round_ in range(SPEED_RUNS + 1):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            pw, pc, dw, dc = _measure_once(models[name], prompt, short)
            if round_:
                r = runs[name]
                r["prefill"].append(PREFILL_TOKENS / pw)
                r["prefill_cpu"].append(PREFILL_TOKENS / pc)
                r["decode"].append(DECODE_TOKENS / dw)
                r["decode_cpu"].append(DECODE_TOKENS / dc)
        print(f"round {round_}/{SPEED_RUNS} done", flush=True)
    return {
        name: {
            "prefill_tok_s": round(statistics.median(r["prefill"]), 1),
            "decode_tok_s": round(statistics.median(r["decode"]), 2),
            "prefill_cpu_tok_s": round(statistics.median(r["prefill_cpu"]), 1),
            "decode_cpu_tok_s": round(statistics.median(r["decode_cpu"]), 2),
            "prefill_runs": [round(x, 1) for x in r["prefill"]],
            "decode_runs": [round(x, 2) for x in r["decode"]],
        }
        for name, r in runs.items()
    }


def run_speed() -> None:
    """Prefill/decode tokens/s of a random SmolLM2-135M-shaped Llama, dense and after each structured
    recipe, beside the ideal speed-up (weight bytes per decode token, FLOPs per prefill)."""
    common.limit_threads(SPEED_THREADS)
    import torch

    from workers.compression.base import Callbacks
    from workers.compression.prune import prune
    from workers.compression.recipe import PruneStep

    base = _speed_model()
    calibration = torch.randint(0, SPEED_CONFIG["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(2))
    models: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    for variant, targets in SPEED_VARIANTS.items():
        model = base if targets is None else copy.deepcopy(base)
        wall = None
        if targets is not None:
            t0 = time.perf_counter()
            step = PruneStep(algorithm="structured", targets=targets)
            model = prune(model, step, calibration=calibration, callbacks=Callbacks()).model.eval()
            wall = round(time.perf_counter() - t0, 2)
        cfg = model.config
        models[variant] = model
        records[variant] = {
            "tool": "modelpress",
            "variant": variant,
            "model": "SmolLM2-135M shape, random weights, float32",
            "targets": targets,
            "prune_wall_s": wall,
            "params": common.count_params(model),
            "layers": len(model.model.layers),
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size,
            "weight_mb_per_token": round(_weight_bytes_per_token(model) / 1e6, 1),
            "prefill_gflop": round(_prefill_flops(model) / 1e9, 1),
            "prefill_tokens": PREFILL_TOKENS,
            "decode_prompt": DECODE_PROMPT,
            "decode_tokens": DECODE_TOKENS,
            "runs": SPEED_RUNS,
        }
    speeds = _tokens_per_second(models)
    dense = records["dense"] | speeds["dense"]
    for variant, record in records.items():
        record.update(speeds[variant])
        record["decode_bound_x"] = round(dense["weight_mb_per_token"] / record["weight_mb_per_token"], 3)
        record["prefill_bound_x"] = round(dense["prefill_gflop"] / record["prefill_gflop"], 3)
        record["decode_x"] = round(record["decode_tok_s"] / dense["decode_tok_s"], 3)
        record["decode_cpu_x"] = round(record["decode_cpu_tok_s"] / dense["decode_cpu_tok_s"], 3)
        record["prefill_x"] = round(record["prefill_tok_s"] / dense["prefill_tok_s"], 3)
        record.update(common.environment())
        common.write_result(SPEED_FILE, record)
        print(
            f"{variant:>14}: decode {record['decode_tok_s']:.2f} tok/s x{record['decode_x']:.3f} "
            f"(CPU-time x{record['decode_cpu_x']:.3f}; bound x{record['decode_bound_x']:.3f}), "
            f"prefill {record['prefill_tok_s']:.1f} tok/s x{record['prefill_x']:.3f} "
            f"(bound x{record['prefill_bound_x']:.3f})",
            flush=True,
        )


def main() -> None:
    """Run the named recipes (default all + speed), one fresh process each, one at a time."""

    def run_child(recipe: str) -> None:
        run_speed() if recipe == "speed" else run_one(recipe)

    def result_file(recipe: str) -> str:
        return SPEED_FILE if recipe == "speed" else RESULT_FILE

    common.run_recipes("modelpress", "bench.run_modelpress", [*RECIPES, "speed"], run_child, result_file)


if __name__ == "__main__":
    main()
