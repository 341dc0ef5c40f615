"""Shared input statistics: one accumulator per shared input, full and diagonal-only modes agree."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_model
from workers.compression.hessian import collect_input_stats
from workers.compression.layerwise import capture_layer_inputs, decoder_layers, run_layer


def test_full_and_diagonal_statistics_agree_and_inputs_are_shared() -> None:
    model = tiny_model()
    batches = capture_layer_inputs(model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), 2)
    layer = decoder_layers(model)[0]
    full = collect_input_stats(layer, lambda: run_layer(layer, batches))
    diag = collect_input_stats(layer, lambda: run_layer(layer, batches), diag_only=True)

    assert full["self_attn.q_proj"] is full["self_attn.k_proj"] is full["self_attn.v_proj"]
    assert full["mlp.gate_proj"] is full["mlp.up_proj"] and full["self_attn.o_proj"] is not full["mlp.gate_proj"]
    assert diag["self_attn.q_proj"] is diag["self_attn.v_proj"]
    for name, stats in full.items():
        assert diag[name].xtx.shape == (stats.xtx.shape[0],)
        assert diag[name].tokens == stats.tokens == 4 * 32
        torch.testing.assert_close(diag[name].channel_norms, stats.channel_norms, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="diag_only"):
        _ = diag["mlp.down_proj"].hessian
