"""Head pruning layouts: whole GQA groups, or the same number of query heads from every group."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from tests.tiny import tiny_model
from workers.compression.structured import _head_plan, shrink


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("cls", "hidden", "heads", "kv", "fraction", "expected"),
    [
        # SmolLM2-135M: 6 query heads either way (nearest to 6.75); on a tie whole groups win.
        (LlamaConfig, 576, 9, 3, 0.25, (6, 2)),
        (LlamaConfig, 576, 9, 3, 0.1, (6, 2)),
        (LlamaConfig, 768, 16, 4, 0.25, (12, 3)),
        (Qwen2Config, 896, 14, 2, 0.25, (10, 2)),  # Qwen2-0.5B: 2 of 7 per group, not a whole group (50 %)
        (Qwen2Config, 896, 14, 2, 0.5, (7, 1)),
        (LlamaConfig, 96, 8, 2, 0.25, (6, 2)),  # 3 of 4 per group, not a whole group (50 %)
        (Qwen2Config, 64, 4, 2, 0.25, (2, 1)),
        (Qwen2Config, 64, 4, 2, 0.5, (2, 1)),
        (Qwen2Config, 64, 4, 1, 0.5, (2, 1)),  # MQA: query heads only
    ],
)
def test_head_plan_picks_the_nearest_valid_layout(cls, hidden, heads, kv, fraction, expected) -> None:
    config = cls(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads)
    keep_q, keep_kv = _head_plan(config, fraction)
    assert (keep_q, keep_kv) == expected
    assert keep_q % keep_kv == 0


def _dead_heads_model(arch: str) -> tuple[PreTrainedModel, list[int]]:
    """8 query heads of dim 12 in 2 GQA groups (hidden 96); one query head per group writes nothing."""
    model = tiny_model(arch, seed=0, hidden_size=96, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)
    d, dead = 12, [1, 6]  # head 1 in group 0 (heads 0-3), head 6 in group 1 (heads 4-7)
    with torch.no_grad():
        for layer in model.model.layers:
            for h in dead:
                layer.self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0.0
    return model, dead


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("use_calibration", [True, False])
def test_query_heads_per_group_keep_every_kv_head(
    arch: str, use_calibration: bool, calibration, tmp_path: Path
) -> None:
    model, dead = _dead_heads_model(arch)
    original = copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    outcome = shrink(model, heads=0.25, calibration=calibration if use_calibration else None)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 2, 12)
    facts = outcome.facts
    assert facts["heads_mode"] == "query_heads_per_group"
    assert facts["heads_dropped_fraction"] == 0.25 and facts["kv_heads_dropped_fraction"] == 0.0
    assert facts["attention_params_dropped_fraction"] == 0.2  # (8 + 2) -> (6 + 2) head-widths
    assert facts["params_after"] == sum(p.numel() for p in model.parameters()) < before
    # q/o lose 2 heads x 12 rows / columns per layer (plus Qwen2's q bias); k/v keep both KV heads.
    q_bias = 12 if arch == "qwen2" else 0
    assert before - facts["params_after"] == 2 * 2 * (2 * 12 * 96 + q_bias)
    d = 12
    for new, old in zip(model.model.layers, original.model.layers, strict=True):
        attn = new.self_attn
        assert tuple(attn.q_proj.weight.shape) == (72, 96) and tuple(attn.o_proj.weight.shape) == (96, 72)
        assert torch.equal(attn.k_proj.weight, old.self_attn.k_proj.weight)
        assert torch.equal(attn.v_proj.weight, old.self_attn.v_proj.weight)
        assert attn.num_key_value_groups == 3
        q_old = old.self_attn.q_proj.weight.view(8, d, -1)
        q_new = attn.q_proj.weight.view(6, d, -1)
        kept = [next(i for i in range(8) if torch.equal(q_old[i], q)) for q in q_new]
        # The dead head of each group goes; the rest stay in order, so head h still reads KV head h // 3.
        assert kept == [h for h in range(8) if h not in dead]
    # Dropping heads that wrote nothing leaves the model's outputs unchanged.
    ids = calibration[:2]
    assert torch.allclose(_logits(model, ids), _logits(original, ids), atol=1e-5)

    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (6, 2)
    assert reloaded.config.head_dim == 12
    assert torch.equal(_logits(reloaded, ids), expected)
    generated = reloaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    full = _logits(reloaded, generated[:, :-1])[:, -4:].argmax(-1)
    assert torch.equal(full, generated[:, -4:])


def test_whole_groups_still_win_when_nearer(calibration) -> None:
    model, _ = _dead_heads_model("qwen2")
    outcome = shrink(model, heads=0.5, mlp=0.25, calibration=calibration)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 1)
    assert outcome.facts["heads_mode"] == "gqa_groups"
    assert outcome.facts["attention_params_dropped_fraction"] == 0.5
    assert model(calibration[:1]).logits.shape == (1, 32, 256)
