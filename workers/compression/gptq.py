"""GPTQ (Frantar et al. 2022): quantize a Linear's weight column by column, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian of its inputs.

Efficient form, as in the paper: the upper Cholesky factor of ``H⁻¹`` replaces repeated inverse
updates, and error updates are applied lazily per block of columns (one matmul per block for
the rest of the matrix). A pure function over tensors: no modules, hooks or I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs

from workers.compression.base import EngineError
from workers.compression.weight_quant import ColumnQuantizer, group_size_of, weight_qparams


@dataclass
class GPTQResult:
    """The quantize-dequantized weight and its qparams (compressed-tensors shapes)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


def _inverse_cholesky(hessian: torch.Tensor, dampening_frac: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H⁻¹``; retries with stronger dampening if not PD."""
    n = hessian.shape[0]
    diag = torch.arange(n, device=hessian.device)
    damp = dampening_frac * torch.mean(torch.diag(hessian))
    for _ in range(4):
        h = hessian.clone()
        h[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return upper
        # Numerically singular (too few tokens for the width): dampen harder, as llm-compressor's
        # users do by hand.
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=hessian.device)
    raise EngineError(f"{name}: Hessian is not positive definite even with strong dampening; add calibration data")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    preserve_zeros: bool = False,
    name: str = "layer",
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (``2/n XᵀX``) with GPTQ.

    ``act_order`` processes columns by descending ``diag(H)``; with groups, the group qparams are
    then fixed up front from the original weight ("static groups", compressed-tensors
    ``actorder='weight'``), so the checkpoint needs no ``g_idx``. ``preserve_zeros`` keeps every
    zero of ``weight`` at exactly zero (masking the error updates), so a pruned model keeps its mask.
    """
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    group = group_size_of(args)
    keep = (w != 0) if preserve_zeros else None

    # Inputs that never fire carry no information: fix their diagonal and zero the weight, as GPTQ does.
    dead = torch.diag(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    # Qparams known before the loop: per channel always (from the whole row, like RTN), and per
    # group under act_order (static groups).
    static_scale: torch.Tensor | None = None
    static_zp: torch.Tensor | None = None
    if group is None or act_order:
        static_scale, static_zp = weight_qparams(w, args)
        static_scale = static_scale.to(torch.float32)
        static_zp = static_zp.to(torch.float32)

    perm: torch.Tensor | None = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        if keep is not None:
            keep = keep[:, perm]

    h_inv = _inverse_cholesky(h, dampening_frac, name)
    del h
    quantize_column = ColumnQuantizer(args, w.device)
    q = torch.zeros_like(w)
    n_groups = in_features // group if group else 1
    scale_out = torch.zeros(out_features, n_groups, dtype=torch.float32, device=w.device)
    zp_out = torch.zeros(out_features, n_groups, dtype=torch.float32, device=w.device)
    cur_scale = cur_zp = None
    if group is None:
        assert static_scale is not None and static_zp is not None
        cur_scale, cur_zp = static_scale[:, 0], static_zp[:, 0]

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h_inv1 = h_inv[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2] if keep is not None else None
        for i in range(i2 - i1):
            col = i1 + i
            if group is not None:
                if act_order:
                    assert perm is not None and static_scale is not None and static_zp is not None
                    g = int(perm[col]) // group
                    cur_scale, cur_zp = static_scale[:, g], static_zp[:, g]
                elif col % group == 0:
                    # Lazy group qparams from the *updated* weights (within-block updates live in w1).
                    cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                    s, z = weight_qparams(cols, args.model_copy(update={"strategy": "channel", "group_size": None}))
                    cur_scale, cur_zp = s[:, 0].to(torch.float32), z[:, 0].to(torch.float32)
                    scale_out[:, col // group], zp_out[:, col // group] = cur_scale, cur_zp
            assert cur_scale is not None and cur_zp is not None
            column = w1[:, i]
            d = h_inv1[i, i]
            qc = quantize_column(column, cur_scale, cur_zp)
            if keep1 is not None:
                qc = qc * keep1[:, i]
            q1[:, i] = qc
            e = (column - qc) / d
            w1[:, i:] -= e.unsqueeze(1) * h_inv1[i, i:].unsqueeze(0)
            if keep1 is not None:
                w1[:, i:] *= keep1[:, i:]
            err1[:, i] = e
        q[:, i1:i2] = q1
        # Lazy batch update of every later column: one matmul per block.
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
        if keep is not None:
            w[:, i2:] *= keep[:, i2:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    if group is None or act_order:
        assert static_scale is not None and static_zp is not None
        scale_out, zp_out = static_scale, static_zp
    scale_param = scale_out.to(weight.dtype)
    zp_param = zp_out.round().to(args.zp_dtype or torch.int8) if not args.symmetric else torch.zeros_like(zp_out)
    return GPTQResult(weight=q.to(weight.dtype), scale=scale_param, zero_point=zp_param)
