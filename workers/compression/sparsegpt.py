"""Pruning masks and the SparseGPT solver, as pure functions over one weight matrix.

``W`` is a Linear weight ``[out_features, in_features]``; ``H = 2/n · XᵀX`` is the Hessian proxy of
its input (see :mod:`workers.compression.hessian`). Nothing here knows about models or layers.

SparseGPT (Frantar & Alistarh, 2023) follows the paper and the reference implementation: the
inverse Hessian's upper Cholesky factor gives the OBS row updates; columns are processed in lazy
blocks; within a block the mask is chosen adaptively by the OBS saliency ``w² / [H⁻¹]²_jj``; for N:M
patterns the mask is chosen per group of M columns as the solver reaches it.
"""

from __future__ import annotations

import torch

from workers.compression.base import EngineError
from workers.compression.hessian import inverse_cholesky


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask (True = prune) keeping the ``n`` highest scores in every ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise EngineError(f"N:M pattern needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask pruning the lowest ``sparsity`` fraction of every output row (Wanda's comparison group)."""
    k = round(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def matrix_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask pruning the lowest ``sparsity`` fraction of the whole matrix (magnitude pruning's group)."""
    flat = scores.reshape(-1)
    k = round(flat.numel() * sparsity)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    name: str = "layer",
) -> tuple[torch.Tensor, float]:
    """Prune ``weight`` to ``sparsity`` (or the N:M pattern ``nm``) with SparseGPT's OBS updates.

    Returns the pruned weight in float32 (caller casts back) and the summed OBS loss
    ``Σ (w - q)² / [H⁻¹]²_jj``, the solver's own estimate of the output error it introduced.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity or nm")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    cols = w.shape[1]
    if nm is not None:
        n, m = nm
        if cols % m:
            raise EngineError(f"N:M pattern needs in_features divisible by {m}, got {cols}")
        # A block must hold whole groups of M so each group's mask is chosen once.
        block_size = max(m, (block_size + m - 1) // m * m)

    # Inputs that never fire carry no information: their weights are free to prune (set to 0).
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_cholesky(h, dampening_frac, name)
    del h

    # Summed on the weight's device: a float() per column would wait for the device every column.
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        count = end - start
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        d1 = torch.diagonal(hinv1)
        if nm is None:
            # Adaptive mask selection over the whole block (rows x block columns), as in the paper.
            mask1 = matrix_prune_mask(w1**2 / d1.unsqueeze(0) ** 2, float(sparsity))  # type: ignore[arg-type]
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = w1[:, i : i + m] ** 2 / d1[i : i + m].unsqueeze(0) ** 2
                mask1[:, i : i + m] = nm_prune_mask(saliency, n, m)
            col = w1[:, i]
            d = d1[i]
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d
            loss += torch.sum(err**2, dtype=torch.float64)
            # OBS update of the not-yet-processed columns of this block.
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # rank-1 update in place
            err1[:, i] = err
        w[:, start:end] = q1
        # Lazy batched update of every column after the block.
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w, float(loss) / 2.0
