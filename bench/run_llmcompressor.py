"""The llm-compressor side of the comparison (runs inside bench/.venv-llmc).

Every recipe runs in a fresh child process (so peak RSS is that recipe's own): load the float32
reference model, build the shared calibration blocks (bench.common.calibration_ids), time the
``oneshot(...)`` call alone, then score the *in-memory* compressed model with
``bench.common.perplexity`` and append one JSON line to ``bench/results/llmcompressor.jsonl``.

``wall_s`` covers oneshot() end to end: recipe/session setup, wrapping the calibration tensors
into a DataLoader, the calibration pipeline (layer-by-layer for GPTQ/SparseGPT/Wanda/SmoothQuant;
data-free for RTN/FP8/magnitude) and finalisation; not model loading, not saving (no output_dir),
not evaluation. Quantized models are evaluated as llm-compressor leaves them (fake-quantized
weights, and quantize-dequantize of activations for W8A8/FP8), which is also how ModelPress's
output is scored.

Usage: ``bench/.venv-llmc/bin/python -m bench.run_llmcompressor [recipe ...]`` (default: all).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

RESULT_FILE = "llmcompressor.jsonl"
LINEARS = r"re:.*layers\.\d+\..*_proj$"  # the decoder's Linear layers (lm_head stays full precision)

# name -> (kind, needs calibration data, description)
RECIPES: dict[str, tuple[str, bool, str]] = {
    "baseline": ("none", False, "float32 reference (dequantized Q4_1 GGUF)"),
    "w8a16_rtn": ("quant", False, "int8 weights per channel, symmetric, RTN"),
    "w4a16_rtn_g64": ("quant", False, "int4 weights, groups of 64, symmetric, RTN"),
    "w4a16_gptq_g64": ("quant", True, "int4 weights, groups of 64, symmetric, GPTQ (damp 0.01, block 128)"),
    "w4a16_gptq_g64_10m": ("quant", True, "w4a16_gptq_g64 on a 10M-parameter 4-layer Llama (time only)"),
    "w8a8_sq": ("quant", True, "int8 weights per channel + int8 dynamic per-token activations, SmoothQuant a=0.5"),
    "fp8_dynamic": ("quant", False, "fp8 e4m3 weights per channel + dynamic per-token activations"),
    "prune_magnitude_50": ("prune", False, "unstructured 50 % by |w| per layer"),
    "prune_wanda_50": ("prune", True, "unstructured 50 %, Wanda |w|*||x||"),
    "prune_sparsegpt_50": ("prune", True, "unstructured 50 %, SparseGPT (damp 0.01, block 128)"),
    "prune_sparsegpt_2of4": ("prune", True, "2:4 semi-structured, SparseGPT"),
}


def _weight_only(bits: int, group_size: int | None) -> dict[str, Any]:
    """Symmetric int weight-only config groups (explicit: the W8A16 preset here is grouped by 128)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if group_size is None:
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    else:
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def build_recipe(name: str) -> list[Any]:
    """The llm-compressor modifiers for one recipe name."""
    from llmcompressor.modifiers.pruning import (
        MagnitudePruningModifier,
        SparseGPTModifier,
        WandaPruningModifier,
    )
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    ignore = ["lm_head"]
    if name == "w8a16_rtn":
        return [QuantizationModifier(config_groups=_weight_only(8, None), ignore=ignore)]
    if name == "w4a16_rtn_g64":
        return [QuantizationModifier(config_groups=_weight_only(4, 64), ignore=ignore)]
    if name in ("w4a16_gptq_g64", "w4a16_gptq_g64_10m"):
        return [GPTQModifier(config_groups=_weight_only(4, 64), ignore=ignore, dampening_frac=0.01, block_size=128)]
    if name == "w8a8_sq":
        return [
            SmoothQuantModifier(smoothing_strength=0.5),
            QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore),
        ]
    if name == "fp8_dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    if name == "prune_magnitude_50":
        return [
            MagnitudePruningModifier(
                targets=[LINEARS], init_sparsity=0.5, final_sparsity=0.5, start=0, end=1, update=1, leave_enabled=False
            )
        ]
    if name == "prune_wanda_50":
        return [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=[LINEARS])]
    if name == "prune_sparsegpt_50":
        return [
            SparseGPTModifier(
                sparsity=0.5, mask_structure="0:0", targets=[LINEARS], dampening_frac=0.01, block_size=128
            )
        ]
    if name == "prune_sparsegpt_2of4":
        return [
            SparseGPTModifier(
                sparsity=0.5, mask_structure="2:4", targets=[LINEARS], dampening_frac=0.01, block_size=128
            )
        ]
    raise KeyError(name)


def calibration_dataset(ids: Any) -> Any:
    """The shared calibration blocks as a HF Dataset of pre-tokenised rows (skips llmc's tokenisation)."""
    from datasets import Dataset

    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def run_one(name: str) -> None:
    """Run one recipe in this process and write its result line."""
    common.limit_threads()
    import llmcompressor

    kind, needs_data, description = RECIPES[name]
    tokenizer = common.load_tokenizer()
    model = common.load_model(common.model_dir_for(name))
    stream = common.eval_ids(tokenizer)
    ids = common.calibration_ids(tokenizer)
    record: dict[str, Any] = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "recipe": name,
        "kind": kind,
        "description": description,
        "calib": f"{ids.shape[0]}x{ids.shape[1]}" if needs_data else "none",
        "calib_digest": common.ids_digest(ids),
        "eval_digest": common.ids_digest(stream),
        **common.environment(),
    }
    if kind != "none":
        from llmcompressor import oneshot

        recipe = build_recipe(name)
        kwargs: dict[str, Any] = {}
        if needs_data:
            kwargs = {
                "dataset": calibration_dataset(ids),
                "num_calibration_samples": ids.shape[0],
                "max_seq_length": ids.shape[1],
                "shuffle_calibration_samples": False,
                "pipeline": "sequential",
            }
        else:
            kwargs = {"pipeline": "datafree"}
        with common.measure(matmul_rate=name in common.FLOOR_RECIPES) as timing:
            model = oneshot(model=model, recipe=recipe, tokenizer=tokenizer, **kwargs)
        record.update(timing.fields())
    else:
        record.update(rss_before_mib=round(common.rss_mib(), 1), peak_rss_mib=round(common.peak_rss_mib(), 1))
    model.eval()
    record["sparsity"] = round(common.sparsity_of(model), 4)
    record["params"] = common.count_params(model)
    record.update(common.perplexity(model, stream))
    common.write_result(RESULT_FILE, record)


def main() -> None:
    """Run the named recipes (default all), one fresh process each, one at a time."""
    common.run_recipes("llm-compressor", "bench.run_llmcompressor", list(RECIPES), run_one, lambda _recipe: RESULT_FILE)


if __name__ == "__main__":
    main()
