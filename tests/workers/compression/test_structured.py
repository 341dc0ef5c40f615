"""Structured pruning: layers, GQA head groups and MLP channels give an ordinary, smaller model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.tiny import tiny_model
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.compression.prune import prune
from workers.compression.recipe import PruneStep, StructuredTargets
from workers.compression.structured import layer_importance, shrink

ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _model(arch: str, **overrides: object) -> PreTrainedModel:
    settings: dict[str, object] = {"num_hidden_layers": 4}
    settings.update(overrides)
    return tiny_model(arch, seed=0, **settings)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_shrink_gives_smaller_ordinary_model_that_reloads(arch: str, calibration, tmp_path: Path) -> None:
    model = _model(arch)
    before = sum(p.numel() for p in model.parameters())
    outcome = shrink(model, drop_layers=0.5, heads=0.5, mlp=0.25, calibration=calibration)
    pruned = outcome.model
    config = pruned.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 2, 1)
    assert (config.head_dim, config.intermediate_size) == (16, 96)
    assert len(pruned.model.layers) == 2
    for index, layer in enumerate(pruned.model.layers):
        attn = layer.self_attn
        assert attn.layer_idx == index
        assert tuple(attn.q_proj.weight.shape) == (32, 64) and tuple(attn.k_proj.weight.shape) == (16, 64)
        assert tuple(attn.v_proj.weight.shape) == (16, 64) and tuple(attn.o_proj.weight.shape) == (64, 32)
        assert tuple(layer.mlp.gate_proj.weight.shape) == (96, 64)
        assert tuple(layer.mlp.down_proj.weight.shape) == (64, 96)
    if arch == "qwen2":
        assert config.layer_types == ["full_attention"] * 2
    after = sum(p.numel() for p in pruned.parameters())
    assert outcome.facts["params_before"] == before and outcome.facts["params_after"] == after < before
    assert outcome.facts["config"]["num_hidden_layers"] == 2
    assert len(outcome.facts["layer_scores"]) == 4 and len(outcome.facts["layers_dropped"]) == 2

    expected = _logits(pruned, calibration)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    assert torch.equal(_logits(reloaded, calibration), expected)
    # Incremental decoding with the KV cache agrees with a full forward pass.
    generated = reloaded.generate(calibration[:1, :8], max_new_tokens=4, do_sample=False)
    full = _logits(reloaded, generated[:, :-1])[:, -4:].argmax(-1)
    assert torch.equal(full, generated[:, -4:])


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_layers_is_exact(arch: str, calibration) -> None:
    model = _model(arch)
    original = copy.deepcopy(model)
    outcome = shrink(model, keep_layers=[3, 0])
    assert outcome.facts["layers_kept"] == [0, 3] and outcome.facts["layers_dropped"] == [1, 2]
    assert model.config.num_hidden_layers == 2
    for new, old in zip(model.model.layers, [original.model.layers[0], original.model.layers[3]], strict=True):
        for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    # Same as running the original with layers 1 and 2 removed by hand.
    reference = copy.deepcopy(original)
    reference.model.layers = nn.ModuleList([reference.model.layers[0], reference.model.layers[3]])
    reference.config.num_hidden_layers = 2
    with torch.no_grad():  # no KV cache: the hand-cut reference keeps stale layer indices
        expected = reference(calibration, use_cache=False).logits
    assert torch.allclose(_logits(model, calibration), expected)
    with pytest.raises(EngineError):
        shrink(copy.deepcopy(original), keep_layers=[0, 4])


@pytest.mark.parametrize("use_calibration", [True, False])
def test_heads_drop_whole_gqa_groups_by_importance(use_calibration: bool, calibration) -> None:
    # 8 query heads in 4 groups of 2; group 1 (q heads 2, 3) is made useless, group 2 very strong.
    model = _model("llama", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    d = 8
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 2 * d : 4 * d] = 0.0
            layer.self_attn.o_proj.weight[:, 4 * d : 6 * d] *= 5.0
    original = copy.deepcopy(model)
    outcome = shrink(model, heads=0.5, calibration=calibration if use_calibration else None)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    assert outcome.facts["importance"] == ("calibration" if use_calibration else "weight_norms")
    for new, old in zip(model.model.layers, original.model.layers, strict=True):
        q_old = old.self_attn.q_proj.weight.view(8, d, -1)
        k_old = old.self_attn.k_proj.weight.view(4, d, -1)
        q_new = new.self_attn.q_proj.weight.view(4, d, -1)
        k_new = new.self_attn.k_proj.weight.view(2, d, -1)
        q_kept = [next(i for i in range(8) if torch.equal(q_old[i], q)) for q in q_new]
        kv_kept = [next(i for i in range(4) if torch.equal(k_old[i], k)) for k in k_new]
        assert 1 not in kv_kept and 2 in kv_kept
        # Query heads follow their KV head: group g owns query heads 2g and 2g+1, in order.
        assert q_kept == [2 * g + r for g in kv_kept for r in range(2)]
        v_new = new.self_attn.v_proj.weight.view(2, d, -1)
        assert all(torch.equal(v_new[j], old.self_attn.v_proj.weight.view(4, d, -1)[g]) for j, g in enumerate(kv_kept))


def test_mqa_drops_query_heads() -> None:
    model = _model("qwen2", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1)
    shrink(model, heads=0.5)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)


def test_llama_head_count_stays_valid_for_its_config(tmp_path: Path) -> None:
    # 8 heads of dim 8 over hidden 64, no GQA: keeping 6 would break LlamaConfig (64 % 6), so 4 are kept.
    model = _model("llama", num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    outcome = shrink(model, heads=0.25)
    assert model.config.num_attention_heads == 4 and outcome.facts["heads_dropped_fraction"] == 0.5
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.num_attention_heads == 4


@pytest.mark.parametrize("use_calibration", [True, False])
def test_mlp_drops_least_important_channels(use_calibration: bool, calibration) -> None:
    model = _model("qwen2", num_hidden_layers=2)
    dead = list(range(0, 128, 4))  # 32 channels that write nothing
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0.0
    original = copy.deepcopy(model)
    shrink(model, mlp=0.25, calibration=calibration if use_calibration else None)
    assert model.config.intermediate_size == 96
    for new, old in zip(model.model.layers, original.model.layers, strict=True):
        alive = [c for c in range(128) if c not in dead]
        assert torch.equal(new.mlp.up_proj.weight, old.mlp.up_proj.weight[alive])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, alive])
        assert new.mlp.intermediate_size == 96
    # Removing channels that contributed nothing leaves the outputs unchanged.
    ids = calibration[:2]
    assert torch.allclose(_logits(model, ids), _logits(original, ids), atol=1e-5)


def test_layer_importance_finds_a_layer_that_does_nothing(calibration) -> None:
    model = _model("llama")
    with torch.no_grad():  # layer 2 becomes the identity: its residual branches write zeros
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = layer_importance(model, calibration)
    assert len(scores) == 4 and scores[2] == pytest.approx(0.0, abs=1e-5)
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    outcome = shrink(model, drop_layers=0.25, calibration=calibration)
    assert outcome.facts["layers_dropped"] == [2]


def test_drop_layers_needs_calibration_and_validates_arguments() -> None:
    with pytest.raises(EngineError, match="calibration"):
        shrink(_model("llama"), drop_layers=0.5)
    with pytest.raises(EngineError):
        shrink(_model("llama"), keep_layers=[0], drop_layers=0.5)
    with pytest.raises(EngineError):
        shrink(_model("llama"))


def test_progress_and_cancel(calibration) -> None:
    seen: list[float] = []
    shrink(
        _model("llama"),
        drop_layers=0.5,
        heads=0.5,
        calibration=calibration,
        callbacks=Callbacks(progress=lambda f, _m: seen.append(f)),
    )
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) >= 6

    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    for kwargs in ({"drop_layers": 0.5, "calibration": calibration}, {"mlp": 0.5}):
        calls["n"] = 0
        with pytest.raises(StepCancelled):
            shrink(_model("llama"), callbacks=Callbacks(should_stop=should_stop), **kwargs)


def test_prune_step_dispatches_structured(calibration) -> None:
    step = PruneStep(algorithm="structured", targets=StructuredTargets(layers=0.5, mlp=0.5))
    outcome = prune(_model("qwen2"), step, calibration=calibration)
    assert outcome.facts["kind"] == "structured"
    assert outcome.model.config.num_hidden_layers == 2 and outcome.model.config.intermediate_size == 64
