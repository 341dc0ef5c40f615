"""Shared input statistics: one accumulator per shared input, full and diagonal-only modes agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny import tiny_model
from workers.compression.hessian import InputStats, _cholesky_lower, collect_input_stats, inverse_cholesky
from workers.compression.layerwise import capture_layer_inputs, decoder_layers, run_layer
from workers.compression.weight_quant import output_error


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


@pytest.mark.parametrize("width", [64, 200, 600])
def test_upper_block_accumulation_mirrors_to_the_full_gram_matrix(width: int) -> None:
    """Only the upper blocks of XᵀX are accumulated (widths >= 128 are split into blocks); after
    finish() the matrix is the full symmetric product of every batch added."""
    gen = torch.Generator().manual_seed(width)
    batches = [torch.randn(2, 37, width, generator=gen) for _ in range(3)]
    stats = InputStats(xtx=torch.zeros(width, width))
    for x in batches:
        stats.add(x)
    stats.finish()
    flat = torch.cat([x.reshape(-1, width) for x in batches]).double()
    torch.testing.assert_close(stats.xtx.double(), flat.T @ flat, rtol=1e-5, atol=1e-3)
    assert stats.tokens == 3 * 2 * 37


def test_stop_early_skips_the_rest_of_the_layer_with_the_same_statistics() -> None:
    """Once every selected Linear has seen its input the layer call ends: selecting o_proj alone never
    runs the MLP, selecting all never completes the down projection; the statistics do not change."""
    model = tiny_model()
    batches = capture_layer_inputs(model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)), 2)
    layer = decoder_layers(model)[0]
    finished: list[str] = []
    for name in ("mlp.up_proj", "mlp.down_proj"):
        layer.get_submodule(name).register_forward_hook(lambda *_a, name=name: finished.append(name))

    only_o = collect_input_stats(layer, lambda: run_layer(layer, batches), lambda n, _m: n == "self_attn.o_proj")
    assert list(only_o) == ["self_attn.o_proj"] and finished == []

    early = collect_input_stats(layer, lambda: run_layer(layer, batches))
    assert finished == ["mlp.up_proj"] * len(batches)
    finished.clear()
    full = collect_input_stats(layer, lambda: run_layer(layer, batches), stop_early=False)
    assert finished == ["mlp.up_proj", "mlp.down_proj"] * len(batches)
    assert set(early) == set(full)
    for name in full:
        torch.testing.assert_close(early[name].xtx, full[name].xtx, rtol=0, atol=0)
    torch.testing.assert_close(only_o["self_attn.o_proj"].xtx, full["self_attn.o_proj"].xtx, rtol=0, atol=0)


@pytest.mark.parametrize("n", [100, 300, 577])
def test_triangular_inverse_by_halves_matches_the_triangular_solve(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n, n, generator=gen)
    h = x.T @ x / n
    upper = inverse_cholesky(h.clone(), 0.01, "test")  # U with H⁻¹ = UᵀU, from the halves
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(n)
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close((upper.T @ upper).double(), torch.linalg.inv(damped.double()), rtol=1e-3, atol=1e-4)
    factor = torch.linalg.cholesky(damped.flip(0, 1)).flip(0, 1)
    reference = torch.linalg.solve_triangular(factor, torch.eye(n), upper=True)
    torch.testing.assert_close(upper, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [150, 577, 1100])
def test_cholesky_by_halves_matches_lapack_and_reports_a_non_positive_definite_input(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=gen)
    h = x.T @ x / n
    lower = h.clone()
    assert _cholesky_lower(lower)
    assert torch.equal(lower, lower.tril())
    torch.testing.assert_close(lower, torch.linalg.cholesky(h), rtol=1e-4, atol=1e-5)
    # Rank-deficient in its second half only: the failure shows up in the Schur complement's factor.
    singular = h.clone()
    singular[-3:, :] = 0.0
    singular[:, -3:] = 0.0
    assert not _cholesky_lower(singular)


def test_a_singular_hessian_is_dampened_harder_until_it_factorises() -> None:
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(0))
    h = x.T @ x  # rank 40 of 300: with no dampening asked for, the first factorisation fails
    assert not _cholesky_lower(h.flip(0, 1).clone())
    upper = inverse_cholesky(h.clone(), 0.0, "test")
    assert torch.isfinite(upper).all() and torch.equal(upper, upper.triu())
    assert bool((torch.diagonal(upper) > 0).all())


def test_output_energies_give_the_output_error_denominator_without_a_matmul() -> None:
    """Every Linear whose forward ran while observed gets Σ‖x Wᵀ‖² (bias left out), which equals
    tr(W H Wᵀ); the early-stopped down projection gets none."""
    model = tiny_model("qwen2")  # q/k/v carry biases
    batches = capture_layer_inputs(model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2)), 2)
    layer = decoder_layers(model)[0]
    stats = collect_input_stats(layer, lambda: run_layer(layer, batches), output_energy=True)
    for name, stat in stats.items():
        scale = stat.output_scale(name)
        if name == "mlp.down_proj":
            assert scale is None
            continue
        assert scale is not None
        weight = layer.get_submodule(name).weight.detach()
        assert scale == pytest.approx(output_error(weight, stat.hessian), rel=1e-4)


def test_output_energy_of_a_half_precision_layer_does_not_overflow() -> None:
    """The energy is summed in float32: an fp16 output whose norm exceeds fp16's range (65504) still
    gives a finite denominator."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 256, bias=False)).half()
    x = (torch.randn(4, 256, 256) * 300).half()
    with torch.no_grad():
        expected = float(layer(x).float().norm()) ** 2
    assert expected > 65504.0**2
    stats = collect_input_stats(layer, lambda: layer(x), output_energy=True, stop_early=False)["0"]
    assert stats.output_energy["0"] == pytest.approx(expected, rel=1e-2)
