"""The evaluation engine on tiny real models: exact perplexity determinism, damage detection,
parameter/bit-width counting, size, speed and the sample."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from tests.helpers import StopAfter
from tests.tiny import sample_text, tiny_model, tiny_tokenizer
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.compression.data import tokenize_stream
from workers.compression.evaluate import (
    Evaluation,
    count_parameters,
    directory_size,
    eval_windows,
    evaluate,
    perplexity,
    zero_fraction,
)

SEQ_LEN = 32
# Small speed settings: the tests check plumbing and signs, never timings.
FAST: dict[str, Any] = {"speed_runs": 1, "sample_tokens": 4, "prefill_tokens": 16}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def eval_ids(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    return eval_windows(tokenizer, sample_text(4), SEQ_LEN, 4 * SEQ_LEN)


@pytest.fixture(scope="module")
def trained() -> PreTrainedModel:
    """The model under test. Untrained: fitting even a tiny model costs seconds on a shared CPU, and
    every property tested here (determinism, damage, counting) holds for any weights."""
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def baseline(trained: PreTrainedModel, eval_ids: torch.Tensor) -> float:
    return perplexity(trained, eval_ids)


# ---------------------------------------------------------------- windows


def test_eval_windows_are_consecutive_non_overlapping_slices(tokenizer: PreTrainedTokenizerFast) -> None:
    text = sample_text(2)
    stream = tokenize_stream(tokenizer, [text])
    windows = eval_windows(tokenizer, text, 16, 100)
    assert windows.shape == (100 // 16, 16)
    assert torch.equal(windows.reshape(-1), stream[: windows.numel()])

    skipped = eval_windows(tokenizer, text, 16, 100, skip_tokens=40)
    assert torch.equal(skipped[0], stream[40:56])


def test_eval_windows_too_short_is_a_user_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(EngineError, match="too short"):
        eval_windows(tokenizer, "tiny", 64, 1000)
    with pytest.raises(EngineError, match="too short"):
        eval_windows(tokenizer, sample_text(1), 16, 1000, skip_tokens=10**6)


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_the_models_own_loss(trained: PreTrainedModel, eval_ids: torch.Tensor) -> None:
    """Equal-length windows: exp(mean of per-window HF losses) is the same quantity."""
    with torch.no_grad():
        losses = [trained(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in eval_ids]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(trained, eval_ids) == pytest.approx(expected, rel=1e-5)


def test_unchanged_model_scores_exactly_the_baseline(
    trained: PreTrainedModel, eval_ids: torch.Tensor, baseline: float, tmp_path: Path
) -> None:
    assert perplexity(trained, eval_ids) == baseline
    assert perplexity(copy.deepcopy(trained), eval_ids) == baseline
    # Save and reload (what the job does with an untouched model) must not move it by one ulp either.
    trained.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert perplexity(reloaded, eval_ids) == baseline


def test_damaged_weights_score_worse(trained: PreTrainedModel, eval_ids: torch.Tensor, baseline: float) -> None:
    """Noise on every Linear weight. A random-init model predicts near-uniformly (ppl ~ vocab size);
    noise of this scale makes it confidently wrong, which must score clearly worse than uniform."""
    damaged = copy.deepcopy(trained)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in damaged.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.5)
    assert perplexity(damaged, eval_ids) > baseline * 1.5


def test_perplexity_of_bf16_model_is_finite_and_close(
    trained: PreTrainedModel, eval_ids: torch.Tensor, baseline: float
) -> None:
    model: torch.nn.Module = copy.deepcopy(trained)  # nn.Module: transformers' typing of .to() is off
    low = perplexity(model.to(torch.bfloat16), eval_ids)
    assert math.isfinite(low)
    assert low == pytest.approx(baseline, rel=0.1)


def test_perplexity_restores_training_mode_and_honours_cancel(trained: PreTrainedModel, eval_ids: torch.Tensor) -> None:
    model = copy.deepcopy(trained).train()
    perplexity(model, eval_ids[:1])
    assert model.training
    with pytest.raises(StepCancelled):
        perplexity(model, eval_ids, callbacks=Callbacks(should_stop=lambda: True))


def test_perplexity_rejects_bad_shapes(trained: PreTrainedModel) -> None:
    with pytest.raises(EngineError):
        perplexity(trained, torch.zeros(8, dtype=torch.long))


# ---------------------------------------------------------------- parameters, bits, size


def test_count_parameters_plain_model() -> None:
    model: torch.nn.Module = tiny_model()
    total, mix = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert mix == {"float32": total}
    _, half_mix = count_parameters(copy.deepcopy(model).to(torch.bfloat16))
    assert half_mix == {"bfloat16": total}


def _linear_weights(model: torch.nn.Module, skip: str = "lm_head") -> int:
    return sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != skip
    )


def test_count_parameters_reads_compressed_tensors_schemes() -> None:
    quantization = pytest.importorskip("compressed_tensors.quantization")
    model = tiny_model()
    total_before = sum(p.numel() for p in model.parameters())
    config = quantization.QuantizationConfig(
        config_groups={"group_0": quantization.preset_name_to_scheme("W8A16", ["Linear"])}, ignore=["lm_head"]
    )
    quantization.apply_quantization_config(model, config)
    assert any(hasattr(m, "weight_scale") for m in model.modules())  # scales added: metadata, not weights

    total, mix = count_parameters(model)
    assert mix["int8"] == _linear_weights(model)
    assert mix["float32"] == total_before - _linear_weights(model)
    assert total == total_before

    # Same answer from config.quantization_config when modules carry no scheme (e.g. another loader).
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            del module.quantization_scheme
    model.config.quantization_config = config.model_dump(mode="json")
    assert count_parameters(model) == (total, mix)


def test_zero_fraction_sees_unstructured_sparsity() -> None:
    model = tiny_model()
    assert zero_fraction(model) == 0.0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, ::2] = 0
    assert zero_fraction(model) == pytest.approx(0.5)


# ---------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def evaluation(trained: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, eval_ids: torch.Tensor) -> Evaluation:
    return evaluate(trained, tokenizer, eval_ids=eval_ids, **FAST)


def test_evaluate_measures_everything(
    evaluation: Evaluation, trained: PreTrainedModel, eval_ids: torch.Tensor, baseline: float
) -> None:
    assert evaluation.perplexity == baseline  # evaluate() and perplexity() agree to the bit
    assert evaluation.parameters == sum(p.numel() for p in trained.parameters())
    assert evaluation.size_method == "in_memory"
    assert evaluation.size_bytes == 4 * evaluation.parameters + sum(b.numel() * 4 for b in trained.buffers())
    assert evaluation.prefill_tokens_per_s is not None and evaluation.prefill_tokens_per_s > 0
    assert evaluation.decode_tokens_per_s is not None and evaluation.decode_tokens_per_s > 0
    assert evaluation.peak_memory_bytes is not None and evaluation.peak_memory_bytes > 0
    assert evaluation.memory_method == "cpu_rss_sampled"
    assert evaluation.speed == {"prefill_tokens": 16, "decode_prompt_tokens": evaluation.speed["decode_prompt_tokens"],
                                "decode_new_tokens": 4, "runs": 1}  # fmt: skip
    assert evaluation.eval_windows == eval_ids.shape[0] and evaluation.eval_tokens == eval_ids.numel()
    assert evaluation.device.startswith("cpu")
    assert isinstance(evaluation.sample, str)
    assert set(evaluation.to_dict()) >= {"perplexity", "parameters", "size_bytes", "sample", "dtypes"}


def test_evaluate_sample_is_the_greedy_continuation(
    evaluation: Evaluation, trained: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = tokenizer(evaluation.sample_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generate: Any = trained.generate  # transformers 5 types this attribute as a Tensor
        out = generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, prompt.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert evaluation.sample == tokenizer.decode(new, skip_special_tokens=True)


def test_evaluate_without_text_or_speed_measures_size_from_directory(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    progress: list[float] = []
    result = evaluate(
        model,
        tokenizer,
        eval_ids=None,
        model_dir=tmp_path,
        measure_speed=False,
        sample_tokens=3,
        callbacks=Callbacks(progress=lambda f, _m: progress.append(f)),
    )
    assert result.perplexity is None and result.eval_tokens == 0
    assert result.prefill_tokens_per_s is None and result.decode_tokens_per_s is None
    assert result.size_method == "directory"
    assert result.size_bytes == directory_size(tmp_path) > (tmp_path / "model.safetensors").stat().st_size
    assert progress and progress[-1] == 1.0


def test_a_cancel_stops_the_perplexity_pass_between_windows(
    trained: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """The baseline and after passes ask should_stop before every window: a cancel costs at most one window."""
    eval_ids = eval_windows(tokenizer, sample_text(4), SEQ_LEN, 16 * SEQ_LEN)
    windows: list[str] = []
    callbacks = Callbacks(progress=lambda _f, m: windows.append(m), should_stop=StopAfter(4))
    with pytest.raises(StepCancelled):
        evaluate(trained, tokenizer, eval_ids=eval_ids, callbacks=callbacks, **FAST)
    assert windows == [f"perplexity window {i}/16" for i in (1, 2, 3)]
