"""A FLOP floor for GPTQ W4A16 on the reference model (issue 8): how fast *could* it be on this CPU?

Counts the floating-point work the layer-by-layer GPTQ pass performs, per decoder layer
(T calibration tokens, n sequences of S tokens, hidden d, MLP width f, KV width d_kv):

* calibration forward: each layer runs once, one group of Linears at a time, each group observed
  on the outputs of the groups already quantized (``workers.compression.layerwise.staged_forward``):
  ``2 * P_layer * T`` for the Linears plus ``4 * T * S * d`` for the two attention products
  (causal attention counted densely, as SDPA computes it on CPU).
* Hessian accumulation: ``2 * T * d_in^2 * b(b+1)/2 / b^2`` per *distinct* input (q/k/v share one,
  gate/up share one, so 4 per layer: attn-in d, o-in d, mlp-in d, down-in f), where ``b`` is the
  number of row panels ModelPress splits ``XᵀX`` into to compute only its upper blocks
  (``workers.compression.hessian.block_count``).
* GPTQ solve: ``d_in^3`` per distinct Hessian (one Cholesky, ``d^3/3``, and one triangular inverse
  by halves in matrix products, ``2 d^3/3``: ``workers.compression.hessian.inverse_cholesky``),
  plus ``2 * d_out * d_in^2 / 2 = d_out * d_in^2`` per module for the column-by-column error
  propagation (each column's error updates all later columns of all rows).
* report: ``2 * d_out * d_in^2`` per module for the denominator ``tr(W H Wᵀ)`` of its relative
  output error.

Everything else (quantize/dequantize elementwise work, norms, softmax, the embedding lookup) is
O(T*d) or O(params) and left out, so the floor is a lower bound. The machine's rate is measured as
dense fp32 ``torch.mm`` of 2048x2048 matrices in a loop with the benchmark's thread count;
``floor_s = FLOPs / rate``. Writes one line to ``bench/results/flop_floor.jsonl``.

Usage: ``.venv/bin/python -m bench.flops`` (reads the reference model's config.json only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from workers.compression.hessian import block_count


def _upper_share(d: int) -> float:
    """Share of ``XᵀX``'s block products computed when only the upper blocks are (see hessian.py)."""
    count = block_count(d)
    return count * (count + 1) / 2 / count**2


def gptq_flops(config: dict[str, Any], samples: int, seq_len: int) -> dict[str, float]:
    """FLOPs of layer-wise GPTQ over every Linear of every decoder layer, by phase."""
    d = config["hidden_size"]
    f = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    d_kv = config["num_key_value_heads"] * head_dim
    tokens = samples * seq_len
    # (d_in, d_out) of every Linear in one decoder layer.
    linears = {"q": (d, d), "k": (d, d_kv), "v": (d, d_kv), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    params_layer = sum(i * o for i, o in linears.values())
    distinct_inputs = [d, d, d, f]  # attn-in (q/k/v), o-in, mlp-in (gate/up), down-in
    forward = 2 * params_layer * tokens + 4 * tokens * seq_len * d
    hessian = sum(2 * tokens * n**2 * _upper_share(n) for n in distinct_inputs)
    inverse = sum(n**3 for n in distinct_inputs)
    propagate = sum(o * i**2 for i, o in linears.values())
    report = sum(2 * o * i**2 for i, o in linears.values())
    per_layer = {"forward": forward, "hessian": hessian, "inverse": inverse, "propagate": propagate, "report": report}
    return {k: v * layers for k, v in per_layer.items()} | {"total": sum(per_layer.values()) * layers}


def main() -> None:
    """Count, measure the rate, write the line."""
    common.limit_threads()
    config = json.loads((common.MODEL_DIR / "config.json").read_text())
    flops = gptq_flops(config, common.CALIB_SAMPLES, common.CALIB_SEQ_LEN)
    rate = common.matmul_gflops()
    record = {
        "recipe": "w4a16_gptq_g64",
        "calib": f"{common.CALIB_SAMPLES}x{common.CALIB_SEQ_LEN}",
        "forward_passes": "1 per layer, one group of Linears at a time",
        "gflop": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "matmul_gflops": round(rate, 1),
        "floor_s": round(flops["total"] / (rate * 1e9), 2),
        **common.environment(),
    }
    common.write_result("flop_floor.jsonl", record)


if __name__ == "__main__":
    main()
