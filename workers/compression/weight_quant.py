"""Weight quantization primitives shared by RTN, GPTQ and AWQ.

All arithmetic goes through compressed-tensors' own ``calculate_qparams`` / ``fake_quantize`` so that
the weights we simulate in memory are bit-for-bit what the compressed-tensors compressor packs and
what ``from_pretrained`` (and vLLM) dequantize.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

# The compiled CPU loops (workers/compression/kernels.py, numba) are used unless a caller turns them
# off. Loading them maps LLVM into the process, ~105 MiB of resident memory: the low-memory engine,
# whose point is its footprint, runs the torch loops instead (a few seconds slower on a 135M model).
_COMPILED_KERNELS: ContextVar[bool] = ContextVar("compiled_kernels", default=True)

# Integer weight scales made exactly representable as GGUF block scales (see gguf_exact_scales).
_GGUF_SCALES: ContextVar[bool] = ContextVar("gguf_exact_scales", default=False)


@contextmanager
def without_compiled_kernels() -> Iterator[None]:
    """Within the block, GPTQ and the clip search use torch ops only (numba is not even imported)."""
    token = _COMPILED_KERNELS.set(False)
    try:
        yield
    finally:
        _COMPILED_KERNELS.reset(token)


@contextmanager
def gguf_exact_scales() -> Iterator[None]:
    """Within the block, integer weight scales are ones a GGUF block stores exactly, so that a GGUF export
    can carry the codes and scales with no re-rounding (:mod:`workers.compression.gguf`).

    GGUF block scales are float16: every scale is rounded to a value that both float16 and the weight's
    dtype hold. Asymmetric scales keep at most 7 significant bits, so that ``Q4_1``'s minimum
    ``m = -d (zero_point + 8)`` (4 bits more) is a float16 too; their zero-points are recomputed from
    the rounded scale. The codes are then computed with these scales as usual (RTN, GPTQ, AWQ), so
    the model, its compressed-tensors checkpoint and the GGUF file hold the same numbers. The change
    to the scales is at most 2⁻¹¹ (2⁻⁷ asymmetric) of their value; without this block nothing changes.
    """
    token = _GGUF_SCALES.set(True)
    try:
        yield
    finally:
        _GGUF_SCALES.reset(token)


def use_compiled_kernels(device: torch.device) -> bool:
    """Whether the compiled loops serve tensors on ``device`` here (CPU only, and not switched off)."""
    return device.type == "cpu" and _COMPILED_KERNELS.get()


def preload_compiled_kernels(device: torch.device) -> None:
    """Start loading the compiled loops in a background thread, for a caller that will need them after
    some torch work (numba and the cached machine code take ~0.5 s to load, and a few seconds to
    compile once on a fresh install; torch ops release the GIL meanwhile). The first call that needs
    them waits on Python's import lock for the rest; a failed import is raised again there."""
    if use_compiled_kernels(device) and _KERNELS_MODULE not in sys.modules:
        threading.Thread(
            target=importlib.import_module, args=(_KERNELS_MODULE,), name="load-kernels", daemon=True
        ).start()


_KERNELS_MODULE = "workers.compression.kernels"


def group_size_of(args: QuantizationArgs) -> int | None:
    """Columns per scale for grouped strategies; ``None`` for one scale per output channel."""
    return args.group_size if args.strategy == QuantizationStrategy.GROUP else None


def weight_qparams(
    weight: torch.Tensor, args: QuantizationArgs, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of a ``[out, in]`` weight: ``[out, 1]`` per channel or ``[out, in/g]`` per group.

    Min/max by default. With ``importance`` (``[in]``, e.g. ``diag(H)``) the range of every row/group
    is shrunk by the factor in :data:`CLIP_GRID` that minimises ``Σ importance_j (w_j - q(w_j))²``: a
    clipped range rounds the bulk of the weights more finely at the cost of a few outliers, and the
    activation weighting keeps the columns that matter exact (integer schemes only).
    """
    group = group_size_of(args)
    w = weight.detach().to(torch.float32)
    rows = w.shape[0]
    grouped = w.reshape(rows, -1, group) if group is not None else w.reshape(rows, 1, -1)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    if importance is not None and args.type == QuantizationType.INT:
        lo, hi = _search_clip(grouped, lo, hi, importance.to(torch.float32).reshape(1, *grouped.shape[1:]), args)
    if group is None:
        lo, hi = lo.reshape(rows, 1), hi.reshape(rows, 1)
    scale, zero_point = calculate_qparams(lo, hi, args)
    if _GGUF_SCALES.get() and args.type == QuantizationType.INT:
        scale, zero_point = _gguf_representable(scale, zero_point, lo, args, weight.dtype)
    return scale.to(weight.dtype), zero_point


def _gguf_representable(
    scale: torch.Tensor, zero_point: torch.Tensor, lo: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` rounded to a float16 value that ``dtype`` holds too (see :func:`gguf_exact_scales`), and
    the zero-point recomputed from it as ``calculate_qparams`` does."""
    s = scale.to(torch.float32)
    if not args.symmetric:
        mantissa, exponent = torch.frexp(s)
        s = torch.ldexp(torch.round(mantissa * 128) / 128, exponent)  # 7 significant bits
    s = s.to(dtype).to(torch.float16).to(torch.float32)
    if args.symmetric:
        return s, zero_point
    q_min, q_max = calculate_range(args, s.device)
    zp = torch.clamp(torch.round(q_min - torch.clamp(lo, max=0.0) / s), float(q_min), float(q_max))
    return s, zp.to(zero_point.dtype)


# Range shrink factors tried by the clip search (1.0 = plain min/max).
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 ... 0.6


def _search_clip(
    grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, importance: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(lo, hi)`` shrunk by the grid factor with the least importance-weighted error:
    compiled on the CPU (one pass, no temporaries the size of the weight), torch ops elsewhere or
    under :func:`without_compiled_kernels`."""
    if not use_compiled_kernels(grouped.device):
        return _search_clip_torch(grouped, lo, hi, importance, args)
    from workers.compression.kernels import best_clip  # numba: imported on first use

    q_min, q_max = (float(v) for v in calculate_range(args, grouped.device))
    factors = torch.tensor(CLIP_GRID, dtype=torch.float32).view(-1, 1, 1)
    cand_lo, cand_hi = lo * factors, hi * factors
    scale, zero_point = calculate_qparams(cand_lo, cand_hi, args)
    choice = best_clip(
        grouped, importance.reshape(grouped.shape[1:]), scale.to(torch.float32),
        zero_point.to(torch.float32), (q_min, q_max),
    ).unsqueeze(0)  # fmt: skip
    return cand_lo.gather(0, choice).squeeze(0), cand_hi.gather(0, choice).squeeze(0)


def _search_clip_torch(
    grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, importance: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_search_clip` as torch ops: one pass over the weight per grid factor."""
    q_min, q_max = (float(v) for v in calculate_range(args, grouped.device))
    best_err = torch.full(lo.shape, float("inf"), device=grouped.device)
    best_lo, best_hi = lo.clone(), hi.clone()
    buffer = torch.empty_like(grouped)
    negated = grouped.neg()
    for factor in CLIP_GRID:
        cand_lo, cand_hi = lo * factor, hi * factor
        scale, zero_point = calculate_qparams(cand_lo, cand_hi, args)
        scale = scale.to(torch.float32).unsqueeze(-1)
        # Σ importance · (q(w) - w)², in one reused buffer.
        q = torch.div(grouped, scale, out=buffer)
        if args.symmetric:
            q.round_().clamp_(q_min, q_max)
        else:
            zp = zero_point.to(torch.float32).unsqueeze(-1)
            q.add_(zp).round_().clamp_(q_min, q_max).sub_(zp)
        delta = torch.addcmul(negated, q, scale, out=buffer)
        err = delta.square_().mul_(importance).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


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

    def __call__(
        self, column: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Quantize-dequantize ``column`` ``[out]`` with ``scale``/``zero_point`` ``[out]`` (zp float),
        into ``out`` when given (no temporaries)."""
        q = torch.div(column, scale, out=out) if out is not None else column / scale
        if self.symmetric:
            return q.round_().clamp_(self.q_min, self.q_max).mul_(scale)
        return q.add_(zero_point).round_().clamp_(self.q_min, self.q_max).sub_(zero_point).mul_(scale)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)``: the squared output error ``‖Δ X‖²`` (up to H's 2/n normalisation) of a weight change Δ."""
    return float(((delta @ hessian) * delta).sum())


def relative_output_error(
    weight: torch.Tensor,
    quantized: torch.Tensor,
    hessian: torch.Tensor,
    error: float | None = None,
    scale: float | None = None,
) -> float:
    """``‖(Q - W) X‖² / ‖W X‖²`` computed from the Hessian, so no activations are stored.

    ``error``: the numerator ``tr(ΔHΔᵀ)`` when the caller already knows it (GPTQ does), and
    ``scale``: the denominator ``tr(WHWᵀ)`` when it was read off the observed outputs
    (:meth:`InputStats.output_scale`); each saves a matmul.
    """
    w = weight.to(torch.float32)
    if scale is None:
        scale = output_error(w, hessian)
    if error is None:
        error = output_error(quantized.to(torch.float32) - w, hessian)
    return error / max(scale, 1e-30)
