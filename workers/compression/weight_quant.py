"""Weight quantization primitives shared by RTN, GPTQ and AWQ.

All arithmetic goes through compressed-tensors' own ``calculate_qparams`` / ``fake_quantize`` so that
the weights we simulate in memory are bit-for-bit what the compressed-tensors compressor packs and
what ``from_pretrained`` (and vLLM) dequantize.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range


def group_size_of(args: QuantizationArgs) -> int | None:
    """Columns per scale for grouped strategies; ``None`` for one scale per output channel."""
    return args.group_size if args.strategy == QuantizationStrategy.GROUP else None


def weight_qparams(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero-point of a ``[out, in]`` weight: ``[out, 1]`` per channel or ``[out, in/g]`` per group."""
    group = group_size_of(args)
    w = weight.detach().to(torch.float32)
    if group is None:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        grouped = w.reshape(w.shape[0], -1, group)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    scale, zero_point = calculate_qparams(lo, hi, args)
    return scale.to(weight.dtype), zero_point


def fake_quantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantizationArgs
) -> torch.Tensor:
    """Quantize-dequantize a whole weight with given qparams (the exact compressed-tensors arithmetic)."""
    zp = None if args.symmetric else zero_point
    return fake_quantize(weight, scale, zp, args)


def rtn(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(dequantized weight, scale, zero_point)``. Zeros stay exactly zero because
    ``calculate_qparams`` always keeps 0 inside the range with an integer zero-point."""
    scale, zero_point = weight_qparams(weight, args)
    return fake_quantize_weight(weight, scale, zero_point, args), scale, zero_point


class ColumnQuantizer:
    """Fast per-column integer quantize-dequantize for GPTQ's inner loop.

    Matches compressed-tensors' ``_quantize_dequantize`` (``x / s + zp``, round half to even, clamp)
    without its per-call dispatch overhead, which matters when called once per input column.
    """

    def __init__(self, args: QuantizationArgs, device: torch.device) -> None:
        if args.type != QuantizationType.INT:
            raise ValueError("ColumnQuantizer handles integer weights only")
        q_min, q_max = calculate_range(args, device)
        self.q_min = float(q_min)
        self.q_max = float(q_max)
        self.symmetric = bool(args.symmetric)

    def __call__(self, column: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``column`` ``[out]`` with ``scale``/``zero_point`` ``[out]`` (zp float)."""
        if self.symmetric:
            return torch.clamp(torch.round(column / scale), self.q_min, self.q_max) * scale
        q = torch.clamp(torch.round(column / scale + zero_point), self.q_min, self.q_max)
        return (q - zero_point) * scale


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)``: the squared output error ``‖Δ X‖²`` (up to H's 2/n normalisation) of a weight change Δ."""
    return float(((delta @ hessian) * delta).sum())


def relative_output_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, error: float | None = None
) -> float:
    """``‖(Q - W) X‖² / ‖W X‖²`` computed from the Hessian, so no activations are stored.

    ``error``: the numerator ``tr(ΔHΔᵀ)`` when the caller already knows it (GPTQ does), saving a matmul.
    """
    w = weight.to(torch.float32)
    denom = output_error(w, hessian)
    if error is None:
        error = output_error(quantized.to(torch.float32) - w, hessian)
    return error / max(denom, 1e-30)
