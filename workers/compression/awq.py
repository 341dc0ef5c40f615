"""AWQ (Lin et al. 2024): activation-aware per-input-channel scaling before weight-only rounding.

Salient input channels (large activations) are scaled up in the weight, and down by the same
factor in the producer of that input, so rounding hurts them less. The scale is searched on a grid
``s = x^r / w^(1-r)`` (llm-compressor's "duo scaling"), picking the ``r`` that minimises the
Linears' output error. Unlike llm-compressor, which re-runs the parent module per grid point, the
error ``‖(Q(W·s)/s - W) X‖²`` is computed in closed form from the Hessian ``XᵀX`` that the layer
loop gathers anyway, so the search needs no extra forward pass and stores no activations. The
activation magnitude is the channel RMS ``sqrt(diag H)`` (AWQ uses mean |x|; both rank channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs

from workers.compression.weight_quant import group_size_of, output_error, rtn


@dataclass
class AWQSearch:
    """Best per-channel scales and the output error with (``error``) and without (``baseline``) them."""

    scales: torch.Tensor
    ratio: float | None
    error: float
    baseline: float


def _weight_magnitude(weights: list[torch.Tensor], args: QuantizationArgs) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its row (or group) maximum, per input channel."""
    w = torch.cat([x.detach().to(torch.float32) for x in weights], dim=0)
    group = group_size_of(args)
    if group is None:
        normalised = w.abs() / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    else:
        grouped = w.abs().reshape(w.shape[0], -1, group)
        normalised = (grouped / grouped.amax(dim=2, keepdim=True).clamp(min=1e-12)).reshape(w.shape)
    return normalised.mean(dim=0)


def _scaled_error(
    weights: list[torch.Tensor], hessian: torch.Tensor, scales: torch.Tensor, args: QuantizationArgs
) -> float:
    total = 0.0
    for weight in weights:
        w = weight.detach().to(torch.float32)
        quantized, _, _ = rtn(w * scales.unsqueeze(0), args)
        total += output_error(quantized / scales.unsqueeze(0) - w, hessian)
    return total


@torch.no_grad()
def awq_search(
    weights: list[torch.Tensor], hessian: torch.Tensor, args: QuantizationArgs, n_grid: int = 20
) -> AWQSearch:
    """Search input-channel scales for Linears sharing one input (weights ``[out_i, in]``, hessian ``[in, in]``).

    The identity (no scaling) is always a candidate, so AWQ is never worse than RTN on this metric.
    """
    h = hessian.to(torch.float32)
    x_mag = torch.sqrt(torch.diag(h).clamp(min=0.0)).clamp(min=1e-8)
    w_mag = _weight_magnitude(weights, args).clamp(min=1e-8)
    ones = torch.ones_like(x_mag)
    baseline = _scaled_error(weights, h, ones, args)
    best = AWQSearch(scales=ones, ratio=None, error=baseline, baseline=baseline)
    for step in range(n_grid):
        ratio = step / n_grid
        scales = x_mag.pow(ratio) / w_mag.pow(1.0 - ratio)
        # Normalise around 1 so the scaled weights stay in a sane range.
        scales = (scales / torch.sqrt(scales.max() * scales.min())).clamp(min=1e-4)
        error = _scaled_error(weights, h, scales, args)
        if error < best.error:
            best = AWQSearch(scales=scales, ratio=ratio, error=error, baseline=baseline)
    return best
