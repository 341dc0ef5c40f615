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

from workers.compression.hessian import inverse_cholesky
from workers.compression.weight_quant import ColumnQuantizer, group_size_of, use_compiled_kernels, weight_qparams


@dataclass
class GPTQResult:
    """The quantize-dequantized weight and its qparams (compressed-tensors shapes)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    row_loss: torch.Tensor
    """GPTQ's own error estimate per output row, ``Σ e²/2`` (``e`` = rounding error / Cholesky diagonal):
    the output error ``tr(Δ H Δᵀ)/2`` of that row against the damped Hessian, at no extra cost. Rows are
    independent, so the rows of several Linears quantized together split it exactly."""

    @property
    def loss(self) -> float:
        """The whole matrix's ``tr(Δ H Δᵀ)/2``."""
        return float(self.row_loss.sum())


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    preserve_zeros: bool = False,
    clip_search: bool = True,
    name: str = "layer",
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (``2/n XᵀX``) with GPTQ.

    ``act_order`` processes columns by descending ``diag(H)``; with groups, the group qparams are
    then fixed up front from the original weight ("static groups", compressed-tensors
    ``actorder='weight'``), so the checkpoint needs no ``g_idx``. ``preserve_zeros`` keeps every
    zero of ``weight`` at exactly zero (masking the error updates), so a pruned model keeps its mask.
    ``clip_search`` picks the up-front scales (per channel, or static groups) by the activation-weighted
    clipping search of :func:`weight_qparams` instead of plain min/max.
    """
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32)  # not written in place: no copy needed
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    group = group_size_of(args)
    keep = (w != 0) if preserve_zeros else None

    # Inputs that never fire carry no information: fix their diagonal and zero the weight, as GPTQ does.
    dead = torch.diag(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w = w.masked_fill(dead, 0.0)

    # Qparams known before the loop: per channel always (from the whole row, like RTN), and per
    # group under act_order (static groups).
    static_scale: torch.Tensor | None = None
    static_zp: torch.Tensor | None = None
    if group is None or act_order:
        static_scale, static_zp = weight_qparams(w, args, importance=torch.diag(h) if clip_search else None)
        static_scale = _as_stored(static_scale, weight.dtype)
        static_zp = static_zp.to(torch.float32)

    # Work on Wᵀ: each input column of W is then a contiguous row, and the per-column rank-1 update
    # of the rest of the block touches one contiguous slab (several times faster on CPU than
    # striding through W's columns). Permuting rows of Wᵀ copies whole rows, too.
    wt = w.T.contiguous()
    del w
    keep_t = keep.T.contiguous() if keep is not None else None
    perm: torch.Tensor | None = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        wt = wt.index_select(0, perm)
        h = h.index_select(0, perm).index_select(1, perm)
        if keep_t is not None:
            keep_t = keep_t.index_select(0, perm)

    h_inv = inverse_cholesky(h, dampening_frac, name)
    del h
    quantize_column = ColumnQuantizer(args, wt.device)
    qt = torch.empty_like(wt)
    n_groups = in_features // group if group else 1
    scale_out = torch.zeros(out_features, n_groups, dtype=torch.float32, device=wt.device)
    zp_out = torch.zeros(out_features, n_groups, dtype=torch.float32, device=wt.device)
    # Per (permuted) input column, the row of qparams it is quantized with, when known up front.
    column_scale = column_zp = None
    if static_scale is not None and static_zp is not None:
        if group is None:
            column_scale = static_scale.T.expand(in_features, out_features)
            column_zp = static_zp.T.expand(in_features, out_features)
        else:
            source = (perm if perm is not None else torch.arange(in_features, device=wt.device)) // group
            column_scale = static_scale.T.contiguous().index_select(0, source)
            column_zp = static_zp.T.contiguous().index_select(0, source)
    cur_scale = cur_zp = None
    row_loss = torch.zeros(out_features, dtype=torch.float64, device=wt.device)

    # A group's qparams are those of its columns taken as one channel.
    per_channel = args.model_copy(update={"strategy": "channel", "group_size": None})

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        h_inv1 = h_inv[i1:i2, i1:i2].contiguous()
        keep1 = keep_t[i1:i2] if keep_t is not None else None
        if column_scale is not None and column_zp is not None:
            # Every column's qparams are known: the whole block in one call.
            scale1, zp1 = column_scale[i1:i2].contiguous(), column_zp[i1:i2].contiguous()
            _quantize_columns(w1, h_inv1, 0, i2 - i1, scale1, zp1, quantize_column, keep1, qt[i1:i2], err1)
        else:
            assert group is not None
            scale1, zp1 = torch.empty_like(w1), torch.empty_like(w1)
            # Runs of columns that share one group; a group's qparams come from the *updated* weights
            # when the loop reaches its first column (within-block updates live in w1).
            a = 0
            while a < i2 - i1:
                col = i1 + a
                b = min(i2 - i1, a + group - col % group)
                if col % group == 0:
                    rows = w1[a : a + group]
                    if rows.shape[0] < group:
                        rows = torch.cat([rows, wt[i2 : i2 + group - rows.shape[0]]])
                    s, z = weight_qparams(rows.T, per_channel)
                    cur_scale, cur_zp = _as_stored(s[:, 0], weight.dtype), z[:, 0].to(torch.float32)
                    scale_out[:, col // group], zp_out[:, col // group] = cur_scale, cur_zp
                assert cur_scale is not None and cur_zp is not None
                scale1[a:b], zp1[a:b] = cur_scale, cur_zp
                _quantize_columns(w1, h_inv1, a, b, scale1, zp1, quantize_column, keep1, qt[i1:i2], err1)
                a = b
        err1.div_(torch.diagonal(h_inv1).unsqueeze(1))
        row_loss += err1.square().sum(dim=0, dtype=torch.float64)
        # Lazy batch update of every later column: one matmul per block.
        wt[i2:].addmm_(h_inv[i1:i2, i2:].T, err1, alpha=-1)
        if keep_t is not None:
            wt[i2:] *= keep_t[i2:]

    if perm is not None:
        qt = qt.index_select(0, torch.argsort(perm))
    q = qt.T
    if group is None or act_order:
        assert static_scale is not None and static_zp is not None
        scale_out, zp_out = static_scale, static_zp
    scale_param = scale_out.to(weight.dtype)
    zp_param = zp_out.round().to(args.zp_dtype or torch.int8) if not args.symmetric else torch.zeros_like(zp_out)
    return GPTQResult(
        weight=q.to(weight.dtype).contiguous(), scale=scale_param, zero_point=zp_param, row_loss=row_loss / 2
    )


def _as_stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as the checkpoint will hold it (in the weight's dtype), in float32 for the loop: a bf16
    model's codes are then exactly those its stored scales dequantize."""
    return scale.to(dtype).to(torch.float32)


def _quantize_columns(
    w1: torch.Tensor,
    h_inv1: torch.Tensor,
    start: int,
    stop: int,
    scale1: torch.Tensor,
    zp1: torch.Tensor,
    quantize_column: ColumnQuantizer,
    keep1: torch.Tensor | None,
    q1: torch.Tensor,
    err1: torch.Tensor,
) -> None:
    """GPTQ's loop over columns ``start:stop`` of one block (see :func:`kernels.gptq_columns` for the
    arguments): compiled on the CPU, torch ops one column at a time on other devices (and under
    :func:`weight_quant.without_compiled_kernels`)."""
    if use_compiled_kernels(w1.device):
        from workers.compression.kernels import gptq_columns  # numba: imported on first use

        q_range = (quantize_column.q_min, quantize_column.q_max)
        gptq_columns(w1, h_inv1, start, stop, scale1, zp1, q_range, keep1, q1, err1)
        return
    # The torch ops, ~7 per column.
    diagonal = torch.diagonal(h_inv1).tolist()
    for i in range(start, stop):
        column = w1[i]
        qc = quantize_column(column, scale1[i], zp1[i], out=q1[i])
        if keep1 is not None:
            qc.mul_(keep1[i])
        # e = w - q; its division by d rides on the rank-1 update of the rest of the block (in place).
        e = torch.sub(column, qc, out=err1[i])
        w1[i + 1 :].addr_(h_inv1[i, i + 1 :], e, alpha=-1.0 / diagonal[i])
        if keep1 is not None:
            w1[i + 1 :] *= keep1[i + 1 :]
