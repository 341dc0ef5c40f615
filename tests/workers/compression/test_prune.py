"""Unstructured pruning: magnitude, Wanda, SparseGPT on tiny Llama and Qwen2 (GQA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from tests.tiny import tiny_model
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.compression.prune import STORAGE_NOTE, prune
from workers.compression.recipe import PruneStep
from workers.compression.sparsegpt import matrix_prune_mask, row_prune_mask, sparsegpt_prune

ARCHS = ["llama", "qwen2"]
ALGORITHMS = ["magnitude", "wanda", "sparsegpt"]
# One outlier channel per group of 4 inputs, so N:M groups can keep them (real LLMs have such channels).
OUTLIERS = [1, 6, 11, 24, 45]


def _outlier_model(arch: str) -> PreTrainedModel:
    """A tiny model whose normed activations have a few large channels, as in real LLMs."""
    model = tiny_model(arch, seed=0, num_hidden_layers=2, intermediate_size=128)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
                norm.weight[OUTLIERS] = 20.0
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, PreTrainedModel]:
    return {arch: _outlier_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 48), generator=gen), torch.randint(0, 256, (8, 48), generator=gen)


def _pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("sparsity", [0.7])
def test_achieved_sparsity_matches_target(models, tokens, arch: str, algorithm: str, sparsity: float) -> None:
    model = copy.deepcopy(models[arch])
    lm_head = model.lm_head.weight.clone()
    outcome = prune(model, PruneStep(algorithm=algorithm, sparsity=sparsity), calibration=tokens[0][:4])
    linears = _pruned_linears(outcome.model)
    assert len(linears) == 14  # 7 Linears x 2 layers
    for name, module in linears.items():
        zeros = float((module.weight == 0).float().mean())
        assert abs(zeros - sparsity) < 0.01, name
        assert outcome.facts["modules"][name] == pytest.approx(zeros, abs=1e-6)
    assert [row["layer"] for row in outcome.facts["layers"]] == [0, 1]
    for row in outcome.facts["layers"]:
        assert abs(row["sparsity"] - sparsity) < 0.01
    assert abs(outcome.facts["achieved_sparsity"] - sparsity) < 0.01
    assert torch.equal(model.lm_head.weight, lm_head)  # ignored by default
    assert outcome.facts["storage"] == "dense" and outcome.facts["speedup"] is False
    assert outcome.facts["note"] == STORAGE_NOTE


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(("arch", "pattern"), [("llama", "2:4"), ("qwen2", "2:4"), ("qwen2", "1:4")])
def test_nm_pattern_holds_in_every_group(models, tokens, arch: str, algorithm: str, pattern: str) -> None:
    n, m = (int(x) for x in pattern.split(":"))
    model = copy.deepcopy(models[arch])
    outcome = prune(model, PruneStep(algorithm=algorithm, pattern=pattern), calibration=tokens[0][:4])
    for name, module in _pruned_linears(outcome.model).items():
        weight = module.weight
        nonzero_per_group = (weight.reshape(weight.shape[0], -1, m) != 0).sum(dim=-1)
        assert int(nonzero_per_group.max()) <= n, name
        assert float((weight == 0).float().mean()) >= 1 - n / m - 1e-6
    assert outcome.facts["pattern"] == pattern
    assert outcome.facts["target_sparsity"] == pytest.approx(1 - n / m)


def _logit_error(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - reference(ids).logits).pow(2).mean())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_calibrated_pruning_beats_magnitude(models, tokens, arch: str, spec: dict) -> None:
    calibration, held_out = tokens
    base = models[arch]
    errors = {}
    for algorithm in ALGORITHMS:
        model = copy.deepcopy(base)
        prune(model, PruneStep(algorithm=algorithm, **spec), calibration=calibration)
        errors[algorithm] = _logit_error(model, base, held_out)
    assert errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_sparsegpt_solver_minimises_layer_output_error() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen) @ torch.randn(32, 32, generator=gen)  # correlated inputs
    x[:, 3] *= 10
    w = torch.randn(16, 32, generator=gen)
    hessian = 2 / x.shape[0] * x.T @ x
    pruned, loss = sparsegpt_prune(w, hessian, sparsity=0.5, block_size=8)
    magnitude = w.masked_fill(matrix_prune_mask(w.abs(), 0.5), 0.0)
    wanda = w.masked_fill(row_prune_mask(w.abs() * x.norm(dim=0), 0.5), 0.0)

    def err(q: torch.Tensor) -> float:
        return float(((w - q) @ x.T).pow(2).sum())

    assert float((pruned == 0).float().mean()) == pytest.approx(0.5, abs=1 / 32)
    assert err(pruned) < err(wanda) < err(magnitude)
    assert loss > 0
    # The N:M path with a block size that is not a multiple of M still yields the exact pattern.
    nm_pruned, _ = sparsegpt_prune(w, hessian, nm=(2, 4), block_size=6)
    assert int((nm_pruned.reshape(16, -1, 4) != 0).sum(-1).max()) <= 2


def test_ignore_leaves_modules_dense(models, tokens) -> None:
    model = copy.deepcopy(models["llama"])
    outcome = prune(
        model, PruneStep(algorithm="wanda", sparsity=0.5, ignore=["down_proj", "re:.*\\.q_proj"]), calibration=tokens[0]
    )
    for name, module in _pruned_linears(model).items():
        dense = name.endswith("down_proj") or name.endswith("q_proj")
        assert (float((module.weight == 0).float().mean()) < 0.01) == dense, name
        assert (name in outcome.facts["modules"]) == (not dense)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_progress_per_layer_and_cancel(models, tokens, algorithm: str) -> None:
    seen: list[tuple[float, str]] = []
    prune(
        copy.deepcopy(models["qwen2"]),
        PruneStep(algorithm=algorithm, sparsity=0.5),
        calibration=tokens[0],
        callbacks=Callbacks(progress=lambda f, msg: seen.append((f, msg))),
    )
    fractions = [f for f, _ in seen]
    assert len(fractions) == 2 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    model = copy.deepcopy(models["qwen2"])
    original = model.model.layers[1].mlp.down_proj.weight.clone()
    stop = {"now": False}

    def progress(_f: float, _m: str) -> None:
        stop["now"] = True  # ask to stop after the first layer

    with pytest.raises(StepCancelled):
        prune(
            model,
            PruneStep(algorithm=algorithm, sparsity=0.5),
            calibration=tokens[0],
            callbacks=Callbacks(progress=progress, should_stop=lambda: stop["now"]),
        )
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, original)  # second layer untouched


@pytest.mark.parametrize("algorithm", ["wanda", "sparsegpt"])
def test_calibrated_algorithms_need_calibration(models, algorithm: str) -> None:
    with pytest.raises(EngineError, match="calibration"):
        prune(copy.deepcopy(models["llama"]), PruneStep(algorithm=algorithm, sparsity=0.5))


def test_bfloat16_model_keeps_dtype(tokens) -> None:
    model = _outlier_model("llama").to(torch.bfloat16)
    prune(model, PruneStep(algorithm="sparsegpt", sparsity=0.5), calibration=tokens[0])
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01
