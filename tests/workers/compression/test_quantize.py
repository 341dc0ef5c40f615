"""The quantize engine on tiny Llama and Qwen2 (GQA) models: every scheme x algorithm round-trips
through a compressed-tensors checkpoint, GPTQ/AWQ/SmoothQuant beat their baselines, and the
contract (ignore, errors, cancellation, sparsity) holds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.tiny import sample_text, tiny_model, tiny_tokenizer
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.compression.export import load_model, save_model
from workers.compression.matching import ModuleMatcher
from workers.compression.prune import prune
from workers.compression.quantize import quantize
from workers.compression.recipe import PruneStep, QuantizeStep


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: threads only fight over the shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calibration(tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(sample_text(6))["input_ids"]
    return torch.tensor(ids[: 8 * 32]).view(8, 32)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


CASES: list[tuple[dict[str, Any], str, int]] = [
    # (step, expected format, bits)
    (dict(scheme="w8a16"), "pack-quantized", 8),
    (dict(scheme="w8a16", algorithm="gptq"), "pack-quantized", 8),
    (dict(scheme="w8a16", algorithm="awq", group_size=32), "pack-quantized", 8),
    (dict(scheme="w4a16", group_size=32), "pack-quantized", 4),
    (dict(scheme="w4a16", algorithm="gptq", group_size=64, act_order=True), "pack-quantized", 4),
    (dict(scheme="w4a16", algorithm="awq", group_size=32, symmetric=False), "pack-quantized", 4),
    (dict(scheme="w8a8"), "int-quantized", 8),
    (dict(scheme="w8a8", algorithm="gptq", activations="static", smoothquant={"alpha": 0.5}), "int-quantized", 8),
    (dict(scheme="fp8"), "float-quantized", 8),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("step", "fmt", "bits"), CASES, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_scheme_round_trips_through_transformers(
    arch: str, step: dict[str, Any], fmt: str, bits: int, calibration: torch.Tensor, tokenizer: Any, tmp_path: Path
) -> None:
    model = tiny_model(arch)
    original = logits(model, calibration[:2])
    outcome = quantize(model, QuantizeStep(**step), calibration=calibration)
    in_memory = logits(model, calibration[:2])
    # Quantization really happened, but the model still works.
    assert 1e-7 < rel_mse(in_memory, original) < 0.1
    assert outcome.facts["bits"] == bits
    assert outcome.facts["ignored_modules"] == ["lm_head"]

    save_model(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == fmt
    assert config["quantization_status"] == "compressed"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert not list(tmp_path.glob("*.bin"))

    if step.get("symmetric", True):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    else:
        reloaded, _ = load_model(tmp_path)  # dequantize route, see export._has_packed_zero_points
    torch.testing.assert_close(logits(reloaded, calibration[:2]), in_memory, rtol=1e-4, atol=1e-4)


def test_int4_weights_on_a_grid(calibration: torch.Tensor) -> None:
    model = tiny_model("llama")
    quantize(model, QuantizeStep(scheme="w4a16", group_size=32, algorithm="gptq"), calibration=calibration)
    weight = model.model.layers[1].mlp.down_proj.weight.detach()
    for group in weight.reshape(weight.shape[0], -1, 32).unbind(1):
        for row in group:
            assert row.unique().numel() <= 16


def test_w8a16_rtn_is_close_to_original(calibration: torch.Tensor) -> None:
    model = tiny_model("qwen2")
    original = logits(model, calibration)
    outcome = quantize(model, QuantizeStep(scheme="w8a16"))  # RTN needs no calibration
    error = rel_mse(logits(model, calibration), original)
    print(f"w8a16 rtn logits rel MSE {error:.2e}")
    assert error < 1e-3
    assert outcome.facts["output_errors"] == {}
    assert all(v < 1e-3 for v in outcome.facts["weight_errors"].values())


def test_gptq_beats_rtn_on_the_model(calibration: torch.Tensor) -> None:
    rtn_model, gptq_model = tiny_model("llama"), tiny_model("llama")
    original = logits(rtn_model, calibration)
    quantize(rtn_model, QuantizeStep(scheme="w4a16", group_size=32), calibration=calibration)
    facts = quantize(
        gptq_model, QuantizeStep(scheme="w4a16", group_size=32, algorithm="gptq"), calibration=calibration
    ).facts
    rtn_error = rel_mse(logits(rtn_model, calibration), original)
    gptq_error = rel_mse(logits(gptq_model, calibration), original)
    print(f"logits rel MSE on calibration: rtn {rtn_error:.4e} gptq {gptq_error:.4e}")
    assert gptq_error < rtn_error
    assert set(facts["output_errors"]) == {n for n in facts["weight_errors"]}
    assert 0 < facts["mean_output_error"] < 0.05


def test_clip_search_is_a_step_option(calibration: torch.Tensor) -> None:
    """clip_search=False fixes the static group scales by plain min/max of the original weight (what
    llm-compressor does); the default searches shrunk ranges; the facts say which ran."""
    from workers.compression.quantize import weight_args
    from workers.compression.weight_quant import weight_qparams

    name = "model.layers.0.self_attn.q_proj"
    scales, facts = {}, {}
    for clip in (True, False):
        model = tiny_model("llama")
        step = QuantizeStep(scheme="w4a16", group_size=32, algorithm="gptq", clip_search=clip)
        facts[clip] = quantize(model, step, calibration=calibration).facts
        scales[clip] = model.get_submodule(name).weight_scale.detach()
    assert facts[True]["clip_search"] is True and facts[False]["clip_search"] is False
    original = tiny_model("llama").get_submodule(name).weight.detach()
    min_max, _ = weight_qparams(original, weight_args(step))
    torch.testing.assert_close(scales[False], min_max.reshape(scales[False].shape), rtol=0, atol=0)
    assert bool((scales[True] <= scales[False]).all()) and not torch.equal(scales[True], scales[False])


def test_awq_beats_rtn_with_salient_channels(calibration: torch.Tensor) -> None:
    def salient() -> nn.Module:
        model = tiny_model("llama", seed=1)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight[:4] *= 20.0  # a few dominant MLP input channels
        return model

    rtn_model, awq_model = salient(), salient()
    original = logits(rtn_model, calibration)
    quantize(rtn_model, QuantizeStep(scheme="w4a16", group_size=32), calibration=calibration)
    quantize(awq_model, QuantizeStep(scheme="w4a16", group_size=32, algorithm="awq"), calibration=calibration)
    rtn_error = rel_mse(logits(rtn_model, calibration), original)
    awq_error = rel_mse(logits(awq_model, calibration), original)
    print(f"salient channels, logits rel MSE: rtn {rtn_error:.4e} awq {awq_error:.4e}")
    assert awq_error < rtn_error


@pytest.mark.parametrize(
    ("ignored", "norm"), [("q_proj", "input_layernorm"), ("gate_proj", "post_attention_layernorm")]
)
def test_smoothquant_still_smooths_a_group_whose_first_linear_is_ignored(
    calibration: torch.Tensor, ignored: str, norm: str
) -> None:
    """The rest of the group (k/v, up) is quantized W8A8, so its shared input is smoothed all the same."""
    model = tiny_model("llama")
    before = [getattr(layer, norm).weight.detach().clone() for layer in model.model.layers]
    step = QuantizeStep(scheme="w8a8", smoothquant={"alpha": 0.5}, ignore=["lm_head", f"re:.*{ignored}"])
    quantize(model, step, calibration=calibration)
    assert all(
        not torch.equal(getattr(layer, norm).weight, w) for layer, w in zip(model.model.layers, before, strict=True)
    )


@pytest.mark.parametrize(
    ("arch", "skipped"),
    [("llama", []), ("gemma", ["input_layernorm", "post_attention_layernorm"]), ("phi", ["input_layernorm"])],
)
def test_smoothquant_leaves_out_mappings_that_would_change_the_float_model(
    calibration: torch.Tensor, arch: str, skipped: list[str]
) -> None:
    """Gemma's norms compute x·(1 + w) and Phi's one norm also feeds its parallel MLP: rescaling them
    by name would change the model before any rounding (logits moved by 100 % and 70 % before this
    check). Those mappings are tried on a calibration batch first and left out."""
    model = tiny_model(arch)
    before = logits(model, calibration)
    outcome = quantize(model, QuantizeStep(scheme="w8a8", smoothquant={"alpha": 0.5}), calibration=calibration)
    assert outcome.facts["scaling_skipped"] == skipped
    after = logits(model, calibration)
    assert float((after - before).norm() / before.norm()) < 0.05


def test_the_scaling_check_does_not_mistake_bf16_rounding_for_a_broken_mapping(calibration: torch.Tensor) -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    outcome = quantize(model, QuantizeStep(scheme="w8a8", smoothquant={"alpha": 0.5}), calibration=calibration)
    assert outcome.facts["scaling_skipped"] == []


def test_smoothquant_reduces_static_w8a8_error_with_outliers(calibration: torch.Tensor) -> None:
    def with_outliers() -> nn.Module:
        model = tiny_model("llama", seed=2)
        with torch.no_grad():
            for layer in model.model.layers:
                # Planted activation outliers in two channels of the q/k/v input (outliers in the
                # gate/up input would mostly hurt down_proj, whose input no norm can smooth).
                layer.input_layernorm.weight[[3, 17]] = 100.0
        return model

    plain, smoothed = with_outliers(), with_outliers()
    original = logits(plain, calibration)
    quantize(plain, QuantizeStep(scheme="w8a8", activations="static"), calibration=calibration)
    quantize(
        smoothed,
        QuantizeStep(scheme="w8a8", activations="static", smoothquant={"alpha": 0.5}),
        calibration=calibration,
    )
    before = rel_mse(logits(plain, calibration), original)
    after = rel_mse(logits(smoothed, calibration), original)
    print(f"static W8A8 with outliers, logits rel MSE: plain {before:.4e} smoothquant {after:.4e}")
    assert after < 0.3 * before


def test_ignore_exact_and_regex(calibration: torch.Tensor, tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    kept = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj")
    }
    ignore = ["lm_head", "model.layers.0.self_attn.q_proj", r"re:.*mlp\.down_proj$"]
    facts = quantize(model, QuantizeStep(scheme="w4a16", group_size=32, ignore=ignore)).facts
    assert set(facts["ignored_modules"]) == {"lm_head", *kept}
    assert facts["quantized_modules"] == 14 - 3
    for name, module in model.named_modules():
        if name in kept:
            assert getattr(module, "quantization_scheme", None) is None
            torch.testing.assert_close(module.weight, kept[name], rtol=0, atol=0)
    assert model.model.layers[0].self_attn.k_proj.quantization_scheme is not None
    save_model(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(reloaded.model.layers[1].mlp.down_proj.weight, kept["model.layers.1.mlp.down_proj"])


def test_bad_group_size_names_the_layer() -> None:
    model = tiny_model("llama", intermediate_size=96)  # down_proj reads 96 channels: not a multiple of 64
    with pytest.raises(EngineError, match=r"model\.layers\.0\.mlp\.down_proj \(in_features=96\)"):
        quantize(model, QuantizeStep(scheme="w4a16", group_size=64))
    assert getattr(model.model.layers[0].mlp.down_proj, "quantization_scheme", None) is None


def test_calibrated_recipe_without_calibration_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="calibration"):
        quantize(tiny_model("llama"), QuantizeStep(scheme="w4a16", group_size=32, algorithm="gptq"))


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_cancel_between_layers(algorithm: str, calibration: torch.Tensor) -> None:
    messages: list[str] = []
    callbacks = Callbacks(progress=lambda f, m: messages.append(m), should_stop=lambda: len(messages) >= 1)
    model = tiny_model("llama")
    with pytest.raises(StepCancelled):
        quantize(model, QuantizeStep(scheme="w8a16", algorithm=algorithm), calibration=calibration, callbacks=callbacks)
    assert len(messages) == 1 and "1/2" in messages[0]


def test_progress_reported_per_layer(calibration: torch.Tensor) -> None:
    seen: list[tuple[float, str]] = []
    quantize(
        tiny_model("llama"),
        QuantizeStep(scheme="w8a16", algorithm="gptq"),
        calibration=calibration,
        callbacks=Callbacks(progress=lambda f, m: seen.append((f, m))),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("layer" in m for _, m in seen) == 2


def _prune_half(model: nn.Module) -> dict[str, torch.Tensor]:
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                w = module.weight
                cut = w.abs().flatten().kthvalue(w.numel() // 2).values
                w[w.abs() <= cut] = 0.0
                masks[name] = w == 0
    return masks


@pytest.mark.parametrize(
    "step",
    [
        dict(scheme="w4a16", group_size=32, algorithm="gptq", act_order=True),
        dict(scheme="w4a16", group_size=32, algorithm="gptq", symmetric=False),
        dict(scheme="w4a16", group_size=32, symmetric=False),
    ],
)
def test_sparsity_mask_survives(step: dict[str, Any], calibration: torch.Tensor) -> None:
    model = tiny_model("qwen2")
    masks = _prune_half(model)
    facts = quantize(model, QuantizeStep(**step), calibration=calibration).facts
    assert len(facts["sparsity_preserved_modules"]) == len(masks)
    for name, module in model.named_modules():
        if name in masks:
            weight = module.weight.detach()
            # Every pruned zero stays exactly zero (rounding may add new zeros, which is fine).
            assert bool((weight[masks[name]] == 0).all()), name
            assert float((weight != 0).float().mean()) > 0.3, name
    # The forward (which re-quantizes the weight) keeps the zeros too.
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        x = torch.eye(layer.in_features)
        effective = layer(x).T - (layer.bias if layer.bias is not None else 0)
    assert bool((effective[masks["model.layers.0.mlp.up_proj"]] == 0).all())


def test_facts_for_the_report(calibration: torch.Tensor) -> None:
    facts = quantize(
        tiny_model("llama"), QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32), calibration=calibration
    ).facts
    assert facts["bits"] == 4 and facts["group_size"] == 32 and facts["symmetric"] is True
    assert facts["ignored_modules"] == ["lm_head"]
    assert len(facts["output_errors"]) == 14
    assert facts["seconds"] > 0
    json.dumps(facts)  # JSON-serialisable for the report


def test_already_quantized_model_is_refused() -> None:
    model = tiny_model("llama")
    quantize(model, QuantizeStep(scheme="w8a16"))
    with pytest.raises(EngineError, match="already quantized"):
        quantize(model, QuantizeStep(scheme="w8a16"))


def test_new_weights_take_fresh_storage_and_a_tied_head_is_refused(calibration: torch.Tensor) -> None:
    """Quantized weights replace the loaded storage (writing into a checkpoint's private mapping would
    copy it page by page); the Parameters stay, so a tied lm_head and embedding still read one tensor.
    Quantizing that tied head is refused: its checkpoint would have no embedding to load."""
    model = tiny_model("llama", tie_word_embeddings=True)
    step = QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32, ignore=[])
    with pytest.raises(EngineError, match="lm_head is tied"):
        quantize(model, step, calibration=calibration)
    model = tiny_model("llama", tie_word_embeddings=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    loaded = q_proj.weight.data_ptr()
    quantize(model, step.model_copy(update={"ignore": ["lm_head"]}), calibration=calibration)
    assert q_proj.weight.data_ptr() != loaded
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_llama_layers_are_quantized_group_by_group(calibration: torch.Tensor) -> None:
    """GPTQ runs each Llama-shape layer once, each group of Linears observed after the groups before it
    were quantized (true sequential); AWQ, which balances Linears against each other first, observes
    whole layers."""
    gptq = quantize(
        tiny_model(), QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32), calibration=calibration
    )
    awq = quantize(tiny_model(), QuantizeStep(scheme="w4a16", algorithm="awq", group_size=32), calibration=calibration)
    assert gptq.facts["true_sequential"] is True
    assert awq.facts["true_sequential"] is False


@pytest.mark.parametrize(
    "ignore",
    [["down_proj"], ["mlp.down_proj", "lm_head"], ["model.layers.0.mlp.down_proj"], [r"re:.*layers\.1\..*_proj$"]],
)
def test_the_same_ignore_selects_the_same_modules_in_quantize_and_prune(ignore: list[str]) -> None:
    """One rule (workers.compression.matching): a plain name matches the full name or its trailing
    components; ``re:`` matches from the start of the full name."""
    quantized = tiny_model("llama")
    facts = quantize(quantized, QuantizeStep(scheme="w8a16", ignore=ignore)).facts
    pruned = prune(tiny_model("llama"), PruneStep(algorithm="magnitude", sparsity=0.5, ignore=ignore)).facts
    # Pruning works on the decoder layers' Linears only; compare there.
    linears = {n for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.")}
    left_by_prune = linears - set(pruned["modules"])
    assert set(facts["ignored_modules"]) & linears == left_by_prune
    assert left_by_prune == {n for n in linears if ModuleMatcher(ignore)(n)}
    assert left_by_prune  # every case ignores something


def test_auto_group_size_picks_the_largest_that_divides_every_width() -> None:
    """SmolLM2-like widths (576 = 64 x 9): 'auto' is 64 there, 128 where it divides, per channel where nothing does."""
    assert QuantizeStep(scheme="w4a16").with_group_size([576, 1536]).group_size == 64
    assert QuantizeStep(scheme="w4a16").with_group_size([512, 1536]).group_size == 128
    assert QuantizeStep(scheme="w4a16").with_group_size([100]).group_size is None
    assert QuantizeStep(scheme="w8a16").with_group_size([512]).group_size is None
    facts = quantize(tiny_model("llama", intermediate_size=96), QuantizeStep(scheme="w4a16")).facts
    assert facts["group_size"] == 32  # hidden 64 and intermediate 96: 32 divides both


def test_null_group_size_quantizes_per_channel(tmp_path: Path, tokenizer: Any) -> None:
    model = tiny_model("llama")
    facts = quantize(model, QuantizeStep(scheme="w4a16", group_size=None)).facts
    assert facts["group_size"] is None
    save_model(model, tokenizer, tmp_path)
    weights = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["strategy"] == "channel" and weights["weights"]["group_size"] is None
