"""GPTQ, AWQ and SmoothQuant as pure functions over tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from torch import nn

from workers.compression.awq import awq_search
from workers.compression.gptq import gptq_quantize
from workers.compression.smoothquant import apply_input_scaling, smoothquant_scales
from workers.compression.weight_quant import relative_output_error, rtn


def correlated_inputs(tokens: int = 512, width: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width**0.5
    scales = torch.logspace(-1, 1, width)
    return (torch.randn(tokens, width, generator=gen) @ mix) * scales


ARGS = [
    QuantizationArgs(num_bits=4, strategy="group", group_size=16),
    QuantizationArgs(num_bits=4, strategy="group", group_size=16, symmetric=False),
    QuantizationArgs(num_bits=4, strategy="channel"),
    QuantizationArgs(num_bits=8, strategy="channel"),
]


@pytest.mark.parametrize("args", ARGS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_below_rtn(args: QuantizationArgs, act_order: bool) -> None:
    x = correlated_inputs()
    hessian = 2 / x.shape[0] * x.T @ x
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    result = gptq_quantize(weight, hessian, args, block_size=16, act_order=act_order)
    rtn_weight, _, _ = rtn(weight, args)
    gptq_error = relative_output_error(weight, result.weight, hessian)
    rtn_error = relative_output_error(weight, rtn_weight, hessian)
    print(
        f"{args.num_bits}b {args.strategy} sym={args.symmetric} act_order={act_order}: gptq {gptq_error:.3e} rtn {rtn_error:.3e}"
    )
    # Act-order matters here: the synthetic inputs put the largest channels last.
    assert gptq_error < (0.5 if act_order else 0.95) * rtn_error
    # The returned weight is exactly representable with the returned qparams.
    from workers.compression.weight_quant import fake_quantize_weight

    again = fake_quantize_weight(result.weight, result.scale, result.zero_point, args)
    torch.testing.assert_close(again, result.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("args", ARGS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_stacked_rows_equals_one_solve_per_module(args: QuantizationArgs, act_order: bool) -> None:
    """Linears sharing an input (q/k/v) are solved together; rows are independent given H, so each
    module's slice of the stacked result is its own solve, and the per-row loss splits exactly."""
    x = correlated_inputs()
    hessian = 2 / x.shape[0] * x.T @ x
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(rows, 64, generator=gen) for rows in (48, 16, 16)]
    stacked = gptq_quantize(torch.cat(weights), hessian, args, block_size=16, act_order=act_order)
    alone = [gptq_quantize(w, hessian, args, block_size=16, act_order=act_order) for w in weights]
    sizes = [w.shape[0] for w in weights]
    for part, single in zip(stacked.weight.split(sizes), alone, strict=True):
        torch.testing.assert_close(part, single.weight, rtol=0, atol=1e-5)
    for part, single in zip(stacked.scale.split(sizes), alone, strict=True):
        torch.testing.assert_close(part, single.scale, rtol=0, atol=0)
    for loss, single in zip(stacked.row_loss.split(sizes), alone, strict=True):
        assert float(loss.sum()) == pytest.approx(single.loss, rel=1e-4)
    # The loss GPTQ tracks is the output error tr(ΔHΔᵀ)/2 against the damped Hessian.
    delta = (alone[0].weight - weights[0]).double()
    damped = hessian.double() + 0.01 * torch.diag(hessian).mean().double() * torch.eye(64, dtype=torch.float64)
    assert alone[0].loss == pytest.approx(float(((delta @ damped) * delta).sum()) / 2, rel=1e-3)


def test_gptq_preserves_zeros_and_handles_dead_inputs() -> None:
    gen = torch.Generator().manual_seed(5)
    # Nearly low-rank inputs: strongly correlated channels, so GPTQ's updates are large.
    x = torch.randn(512, 4, generator=gen) @ torch.randn(4, 64, generator=gen) + 0.05 * torch.randn(
        512, 64, generator=gen
    )
    x[:, 5] = 0.0  # a dead input channel
    hessian = 2 / x.shape[0] * x.T @ x
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    weight[torch.rand(32, 64, generator=torch.Generator().manual_seed(3)) < 0.5] = 0.0
    mask = weight == 0
    # 8 bits: a fine grid, so error updates landing on pruned positions would not round back to 0.
    args = QuantizationArgs(num_bits=8, strategy="group", group_size=16, symmetric=False)
    kept = gptq_quantize(weight, hessian, args, preserve_zeros=True)
    assert bool((kept.weight[mask] == 0).all())
    filled = gptq_quantize(weight, hessian, args, preserve_zeros=False)
    assert int((filled.weight[mask] != 0).sum()) > 0  # without the mask GPTQ does fill zeros
    assert torch.isfinite(kept.weight).all()


def test_awq_search_never_worse_and_finds_salient_channels() -> None:
    x = correlated_inputs(seed=4)
    x[:, :3] *= 30.0  # salient channels
    hessian = 2 / x.shape[0] * x.T @ x
    weights = [torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    search = awq_search(weights, hessian, QuantizationArgs(num_bits=4, strategy="group", group_size=16))
    print(f"awq error {search.error:.3e} baseline {search.baseline:.3e} ratio {search.ratio}")
    assert search.ratio is not None and search.error < 0.95 * search.baseline
    # Salient channels are scaled up relative to their (equally weighted) neighbours.
    assert float(search.scales[:3].min()) > 2 * float(search.scales[3:6].max())


def test_smoothing_is_function_preserving_and_flattens_inputs() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight[2] = 50.0
    linears = [nn.Linear(16, 8), nn.Linear(16, 4)]
    x = torch.randn(32, 16)
    before = [lin(norm(x)) for lin in linears]
    act = norm(x).abs().amax(dim=0).detach()
    scales = smoothquant_scales(act, [lin.weight for lin in linears], alpha=0.5)
    apply_input_scaling(norm, linears, scales)
    after = [lin(norm(x)) for lin in linears]
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    smoothed = norm(x).abs().amax(dim=0).detach()
    assert float(smoothed.max() / smoothed.median()) < float(act.max() / act.median())


@pytest.mark.parametrize(("args", "factor"), [(ARGS[0], 0.95), (ARGS[1], 1.0), (ARGS[2], 0.95)])
def test_clip_search_lowers_the_output_error(args: QuantizationArgs, factor: float) -> None:
    """The activation-weighted range search beats min/max scales on weights with a few outliers
    (clearly for symmetric ranges; asymmetric min/max already follows the data closely)."""
    x = correlated_inputs(width=128)
    hessian = 2 / x.shape[0] * x.T @ x
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(3))
    weight[:, :3] *= 6  # outlier columns stretch every min/max range
    plain = gptq_quantize(weight, hessian, args, act_order=True, clip_search=False)
    searched = gptq_quantize(weight, hessian, args, act_order=True, clip_search=True)
    plain_error = relative_output_error(weight, plain.weight, hessian)
    searched_error = relative_output_error(weight, searched.weight, hessian)
    assert searched_error < factor * plain_error, (searched_error, plain_error)


@pytest.mark.parametrize("args", ARGS[:2])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_column_loop_matches_torch_ops(args: QuantizationArgs, masked: bool) -> None:
    """The numba column loop (CPU) and the torch-op loop (other devices) do the same arithmetic."""
    from workers.compression.gptq import _quantize_columns
    from workers.compression.hessian import inverse_cholesky
    from workers.compression.kernels import gptq_columns
    from workers.compression.weight_quant import ColumnQuantizer, weight_qparams, without_compiled_kernels

    gen = torch.Generator().manual_seed(5)
    x = correlated_inputs(width=32)
    h_inv = inverse_cholesky(2 / x.shape[0] * x.T @ x, 0.01, "test")
    wt = torch.randn(32, 40, generator=gen)  # Wᵀ: 32 input columns of 40 rows
    keep = torch.rand(32, 40, generator=gen) > 0.5 if masked else None
    if keep is not None:
        wt *= keep
    scale, zp = weight_qparams(wt.T, args)  # [40, 2] groups of 16
    scale1 = scale.T.repeat_interleave(16, dim=0).contiguous()
    zp1 = zp.T.to(torch.float32).repeat_interleave(16, dim=0).contiguous()
    quantizer = ColumnQuantizer(args, wt.device)
    outputs = []
    for loop in ("compiled", "torch"):
        w1, q1, err1 = wt.clone(), torch.empty_like(wt), torch.empty_like(wt)
        if loop == "compiled":
            gptq_columns(w1, h_inv, 3, 29, scale1, zp1, (quantizer.q_min, quantizer.q_max), keep, q1, err1)
        else:
            with without_compiled_kernels():
                _quantize_columns(w1, h_inv, 3, 29, scale1, zp1, quantizer, keep, q1, err1)
        outputs.append((w1, q1[3:29], err1[3:29]))
    (w_c, q_c, e_c), (w_t, q_t, e_t) = outputs
    # Rounding can flip only where float sums of a different order straddle a .5 boundary.
    assert float((q_c != q_t).float().mean()) < 0.01
    torch.testing.assert_close(w_c[29:], w_t[29:], rtol=1e-4, atol=1e-4)  # later columns got the same updates
    torch.testing.assert_close(e_c, e_t, rtol=1e-4, atol=1e-4)
    assert not bool((q_c == 0).all())
    if keep is not None:
        assert bool((q_c[~keep[3:29]] == 0).all()) and bool((w_c[29:][~keep[29:]] == 0).all())


@pytest.mark.parametrize("args", ARGS[:3])
def test_compiled_clip_search_matches_torch_ops(args: QuantizationArgs) -> None:
    from workers.compression.weight_quant import _search_clip, _search_clip_torch

    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(64, 128, generator=gen)
    weight[:, :2] *= 6
    group = args.group_size if args.strategy == "group" else 128
    grouped = weight.reshape(64, -1, group)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    importance = torch.rand(1, *grouped.shape[1:], generator=gen)
    compiled = _search_clip(grouped, lo, hi, importance, args)
    reference = _search_clip_torch(grouped, lo, hi, importance, args)
    same = (compiled[0] == reference[0]) & (compiled[1] == reference[1])
    assert float(same.float().mean()) > 0.99
    assert bool((compiled[1] < hi).any()), "the search should clip some ranges of outlier-heavy weights"


def test_kernels_compile_without_a_writable_cache() -> None:
    """Where numba finds no writable cache location it cannot cache (here: a function with no source
    file); the kernels then compile per process instead of failing the import."""
    import numba

    from workers.compression.kernels import jit

    namespace: dict[str, object] = {}
    exec("def twice(x):\n    return 2.0 * x\n", namespace)  # a function without a source file
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(numba.float64(numba.float64), cache=True)(namespace["twice"])
    assert jit(numba.float64(numba.float64))(namespace["twice"])(3.0) == 6.0


@pytest.mark.slow
def test_kernels_load_in_the_background_unless_switched_off() -> None:
    """A fresh process: ``preload_compiled_kernels`` imports the kernels on a background thread; under
    ``without_compiled_kernels`` (the low-memory engine) numba is never loaded."""
    script = (
        "import sys, threading, torch\n"
        "from workers.compression.weight_quant import preload_compiled_kernels, without_compiled_kernels\n"
        "with without_compiled_kernels():\n"
        "    preload_compiled_kernels(torch.device('cpu'))\n"
        "assert threading.active_count() == 1 and 'numba' not in sys.modules\n"
        "preload_compiled_kernels(torch.device('cpu'))\n"
        "loader = [t for t in threading.enumerate() if t.name == 'load-kernels']\n"
        "assert len(loader) == 1\n"
        "loader[0].join(120)\n"
        "assert 'workers.compression.kernels' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[3], timeout=180)
