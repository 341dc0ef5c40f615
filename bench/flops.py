"""A FLOP floor for GPTQ W4A16 on the reference model (issue 8): how fast *could* it be on this CPU?

Counts the floating-point work the layer-by-layer GPTQ pass cannot avoid, per decoder layer
(T calibration tokens, n sequences of S tokens, hidden d, MLP width f, KV width d_kv):

* calibration forwards: one observation pass per layer that ends as soon as the last Linear
  (``down_proj``) has seen its input (``2 * (P_layer - P_down) * T + 4 * T * S * d``: matmuls over
  the layer's other Linear weights plus the two attention products, causal attention computed
  densely as SDPA does on CPU), and one propagation pass of the quantized layer over everything
  (``2 * P_layer * T + 4 * T * S * d``).
* Hessian accumulation: ``2 * T * d_in^2 * b(b+1)/2 / b^2`` per *distinct* input (q/k/v share one,
  gate/up share one, so 4 per layer: attn-in d, o-in d, mlp-in d, down-in f), where ``b`` is the
  number of column blocks ModelPress splits ``XᵀX`` into to compute only the upper blocks of the
  symmetric product (``workers.compression.hessian``: 4 for d >= 512).
* GPTQ solve: ``(2/3) d_in^3`` per distinct Hessian (one Cholesky and one triangular inverse,
  ``workers.compression.hessian.inverse_cholesky``),
  plus ``2 * d_out * d_in^2 / 2 = d_out * d_in^2`` per module for the column-by-column error
  propagation (each column's error updates all later columns of all rows).

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


def _upper_share(d: int) -> float:
    """Share of ``XᵀX``'s block products computed when only the upper blocks are (see hessian.py)."""
    count = 4 if d >= 512 else (2 if d >= 128 else 1)
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
    attention = 4 * tokens * seq_len * d
    observe = 2 * (params_layer - f * d) * tokens + attention
    propagate_pass = 2 * params_layer * tokens + attention
    forward = observe + propagate_pass
    hessian = sum(2 * tokens * n**2 * _upper_share(n) for n in distinct_inputs)
    inverse = sum(2 / 3 * n**3 for n in distinct_inputs)
    propagate = sum(o * i**2 for i, o in linears.values())
    per_layer = {"forward": forward, "hessian": hessian, "inverse": inverse, "propagate": propagate}
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
        "forward_passes": "1 observation (stops before down_proj) + 1 propagation",
        "gflop": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "matmul_gflops": round(rate, 1),
        "floor_s": round(flops["total"] / (rate * 1e9), 2),
        **common.environment(),
    }
    common.write_result("flop_floor.jsonl", record)


if __name__ == "__main__":
    main()
