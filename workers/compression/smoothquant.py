"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8.

For Linears fed by one normalisation (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``), input channel ``j`` is divided by ``s_j`` in the norm's weight and
multiplied by ``s_j`` in every Linear's weight column. The float function is unchanged; the
activations become flatter (easier per-tensor/per-token int8), the weights a little spikier.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.base import set_weight


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` over all Linears sharing the input (the paper's rule)."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    a = act_absmax.to(torch.float32).clamp(min=1e-5)
    scales = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)
    # Channels that never fire or have no weight keep scale 1 instead of exploding.
    scales = torch.where((act_absmax > 0) & (w_absmax > 0), scales, torch.ones_like(scales))
    return scales.clamp(min=1e-5)


@torch.no_grad()
def apply_input_scaling(previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide ``previous``'s output channels by ``scales`` and multiply the ``linears``' input columns by them.

    ``previous`` is a norm (1-D ``weight``, optional ``bias``) or a Linear whose output rows feed the
    ``linears`` directly (e.g. ``v_proj → o_proj``, ``up_proj → down_proj`` through the elementwise
    gate, which commutes with a per-channel scale). Weights get new storage (:func:`set_weight`): the
    loaded checkpoint's pages are not written, so they can be released.
    """
    weight = previous.weight
    assert isinstance(weight, torch.Tensor)
    s = scales.to(device=weight.device, dtype=weight.dtype)
    set_weight(previous, weight / (s if weight.ndim == 1 else s.unsqueeze(1)))
    bias = getattr(previous, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for linear in linears:
        set_weight(linear, linear.weight * s.to(linear.weight.dtype).unsqueeze(0))
