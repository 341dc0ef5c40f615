"""Compiled CPU loops for the two places where the engines do sequential, element-wise work that torch
can only express as many tiny ops: GPTQ's column loop and the clip search over weight groups.

Per column, GPTQ's loop is ~7 torch ops on a few hundred floats each, so on CPU its time is op
dispatch (~50 µs a column, ~100k columns on a 135M model). Numba compiles the same loops to native
code once (cached on disk next to this file, or in ``NUMBA_CACHE_DIR``) with the same arithmetic as
compressed-tensors: IEEE float32 division by the scale, round half to even (``rint``, as
``torch.round``), the same clamp. One formula serves both symmetric and asymmetric schemes: a
symmetric zero-point is 0, and ``x + 0`` is exact. The torch loops stay in the callers for tensors
on other devices (and for the low-memory engine), and the tests check that both agree to float
rounding. Nothing imports this module until a compiled loop is first needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch

_F32_2D = numba.float32[:, ::1]
_F32_3D = numba.float32[:, :, ::1]

# Explicit signatures: one specialisation per kernel, compiled (or loaded from the cache) on import.
_GPTQ_SIGNATURE = numba.void(
    _F32_2D, _F32_2D, numba.intp, numba.intp, _F32_2D, _F32_2D, numba.float32, numba.float32,
    numba.boolean[:, ::1], numba.boolean, _F32_2D, _F32_2D,
)  # fmt: skip
_CLIP_SIGNATURE = numba.void(_F32_3D, _F32_2D, _F32_3D, _F32_3D, numba.float32, numba.float32, numba.intp[:, ::1])


def jit(signature: Any, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit`` with an on-disk cache (next to this file, in ``NUMBA_CACHE_DIR`` or the user's
    cache directory); where none of them is writable (a read-only image without a home), compile
    once per process instead of failing."""

    def decorate(function: Callable[..., Any]) -> Any:
        try:
            return numba.njit(signature, cache=True, nogil=True, boundscheck=False, **options)(function)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(signature, cache=False, nogil=True, boundscheck=False, **options)(function)

    return decorate


@jit(_GPTQ_SIGNATURE, fastmath={"contract"})
def _gptq_columns(w1, h_inv1, start, stop, scale, zero_point, q_min, q_max, keep, masked, q_out, err_out):
    block, rows = w1.shape
    for i in range(start, stop):
        # As torch's addr_ (BLAS ger) does it: alpha = -1/d in double, rounded to float32, then w + (alpha·h)·e
        # as a fused multiply-add. The results agree with the torch loop to float rounding, not bit for bit.
        alpha = np.float32(-1.0 / np.float64(h_inv1[i, i]))
        for r in range(rows):
            w = w1[i, r]
            s = scale[i, r]
            z = zero_point[i, r]
            q = (min(max(np.rint(w / s + z), q_min), q_max) - z) * s
            if masked and not keep[i, r]:
                q = np.float32(0.0)
            q_out[i, r] = q
            err_out[i, r] = w - q
        for k in range(i + 1, block):
            c = alpha * h_inv1[i, k]
            for r in range(rows):
                w1[k, r] = w1[k, r] + c * err_out[i, r]
            if masked:
                for r in range(rows):
                    if not keep[k, r]:
                        w1[k, r] = np.float32(0.0)


def gptq_columns(
    w1: torch.Tensor,
    h_inv1: torch.Tensor,
    start: int,
    stop: int,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    q_range: tuple[float, float],
    keep: torch.Tensor | None,
    q_out: torch.Tensor,
    err_out: torch.Tensor,
) -> None:
    """GPTQ's loop over columns ``start:stop`` of one block, in place.

    ``w1`` ``[block, rows]`` is the block of ``Wᵀ`` (column j of W is row j); ``h_inv1`` the block's
    ``[block, block]`` slice of the upper Cholesky factor of ``H⁻¹``; ``scale``/``zero_point``
    ``[block, rows]`` the qparams each column is quantized with (zero-points as floats). Writes the
    quantize-dequantized column j to ``q_out[j]`` and ``w - q`` (not yet divided by ``h_inv1[j, j]``)
    to ``err_out[j]``, and pushes each column's error onto the block's later columns. ``keep`` (bool,
    shaped like ``w1``) pins pruned weights at zero. Every tensor is float32 (bool for ``keep``) on
    the CPU; the three written in place must be C-contiguous.
    """
    mask = keep.contiguous().numpy() if keep is not None else np.ones((1, 1), dtype=np.bool_)
    _gptq_columns(
        w1.numpy(), h_inv1.contiguous().numpy(), start, stop, scale.contiguous().numpy(),
        zero_point.contiguous().numpy(), np.float32(q_range[0]), np.float32(q_range[1]), mask, keep is not None,
        q_out.numpy(), err_out.numpy(),
    )  # fmt: skip


# reassoc lets LLVM vectorise the error sum; every other operation keeps strict IEEE semantics.
@jit(_CLIP_SIGNATURE, fastmath={"reassoc"})
def _clip_choice(grouped, importance, scales, zero_points, q_min, q_max, best):
    rows, groups, width = grouped.shape
    for r in range(rows):
        for g in range(groups):
            least = np.float32(np.inf)
            for f in range(scales.shape[0]):
                s = scales[f, r, g]
                z = zero_points[f, r, g]
                err = np.float32(0.0)
                for j in range(width):
                    w = grouped[r, g, j]
                    d = (min(max(np.rint(w / s + z), q_min), q_max) - z) * s - w
                    err += importance[g, j] * d * d
                if err < least:
                    least = err
                    best[r, g] = f


def best_clip(
    grouped: torch.Tensor,
    importance: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    q_range: tuple[float, float],
) -> torch.Tensor:
    """Index of the candidate qparams with the least ``Σ importance · (q(w) - w)²``, for every group.

    ``grouped`` ``[rows, groups, width]``, ``importance`` ``[groups, width]``, candidate ``scales`` /
    ``zero_points`` ``[candidates, rows, groups]``, all float32 on the CPU. Ties keep the earlier
    candidate. Returns ``[rows, groups]`` int64.
    """
    rows, groups, _ = grouped.shape
    best = np.zeros((rows, groups), dtype=np.intp)
    _clip_choice(
        grouped.contiguous().numpy(), importance.contiguous().numpy(), scales.contiguous().numpy(),
        zero_points.contiguous().numpy(), np.float32(q_range[0]), np.float32(q_range[1]), best,
    )  # fmt: skip
    return torch.from_numpy(best).to(torch.int64)
