"""A job's texts: the held-out slice, and a warning for every way the text fell short of the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tests.tiny import sample_text, tiny_tokenizer, write_model_dir
from workers.compression.data import tokenize_stream
from workers.compression.evaluate import MIN_PERPLEXITY_TOKENS
from workers.compression.recipe import Recipe
from workers.local import compress_local
from workers.texts import prepare_texts

QUANTIZE = {"method": "quantize", "scheme": "w8a16"}
GPTQ = {"method": "quantize", "scheme": "w8a16", "algorithm": "gptq"}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_enough_evaluation_text_is_scored_without_a_warning(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    recipe = Recipe.model_validate({"steps": [QUANTIZE], "evaluation": {"seq_len": 64, "max_tokens": 4096}})
    texts = prepare_texts(tokenizer, recipe, evaluation_files=[_write(tmp_path / "eval.txt", sample_text(5))])
    assert texts.eval_ids is not None and tuple(texts.eval_ids.shape) == (64, 64)
    assert texts.eval_source == "evaluation" and texts.perplexity_not_measured is None
    assert texts.warnings == []


def test_evaluation_text_shorter_than_a_window_is_a_warning(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """max_tokens is a cap ("at most"); the window length is what was asked, and a shorter one is a warning."""
    recipe = Recipe.model_validate({"steps": [QUANTIZE], "evaluation": {"seq_len": 8192, "max_tokens": 65536}})
    texts = prepare_texts(tokenizer, recipe, evaluation_files=[_write(tmp_path / "eval.txt", sample_text(3))])
    assert texts.eval_ids is not None and texts.eval_ids.shape[0] == 1
    scored = texts.eval_ids.numel()
    assert MIN_PERPLEXITY_TOKENS <= scored < 8192
    assert texts.warnings == [
        f"Perplexity was scored in one window of {scored:,} tokens, shorter than the seq_len 8,192 asked: the "
        "evaluation text is short."
    ]


def test_too_little_evaluation_text_gives_no_perplexity_and_says_why(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    recipe = Recipe.model_validate({"steps": [QUANTIZE], "evaluation": {"seq_len": 16, "max_tokens": 256}})
    texts = prepare_texts(tokenizer, recipe, evaluation_files=[_write(tmp_path / "eval.txt", sample_text(1))])
    assert texts.eval_ids is None and texts.eval_source == "none"
    assert texts.perplexity_not_measured == (
        "the evaluation text gives 256 tokens to score, fewer than the 2,048 a perplexity is reported from"
    )
    assert texts.evaluation_info()["not_measured_reason"] == texts.perplexity_not_measured


def test_a_held_out_slice_too_short_to_score_is_left_to_calibration(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """10 % of ~4,000 tokens is too few to report a perplexity from: nothing is held out, calibration keeps
    all of it, and the report will say why perplexity is missing."""
    recipe = Recipe.model_validate({"steps": [GPTQ], "calibration": {"num_samples": 256, "seq_len": 16}})
    calibration = _write(tmp_path / "calib.txt", sample_text(4))
    texts = prepare_texts(tokenizer, recipe, calibration_files=[calibration])
    assert texts.eval_ids is None and texts.eval_source == "none"
    assert texts.perplexity_not_measured is not None
    assert texts.perplexity_not_measured.startswith("the held-out slice of the calibration text gives ")
    tokens = tokenize_stream(tokenizer, [sample_text(4)]).numel()
    assert texts.calibration is not None and texts.calibration.numel() == tokens // 16 * 16  # none held out


def test_a_long_calibration_text_gives_its_last_tenth_to_evaluation(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    recipe = Recipe.model_validate({"steps": [GPTQ], "calibration": {"num_samples": 8, "seq_len": 64}})
    texts = prepare_texts(tokenizer, recipe, calibration_files=[_write(tmp_path / "calib.txt", sample_text(30))])
    assert texts.eval_source == "calibration_heldout"
    assert texts.eval_ids is not None and texts.eval_ids.numel() >= MIN_PERPLEXITY_TOKENS
    assert texts.warnings == []


def test_calibration_text_shorter_than_asked_is_a_warning(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    recipe = Recipe.model_validate({"steps": [GPTQ], "calibration": {"num_samples": 128, "seq_len": 512}})
    texts = prepare_texts(tokenizer, recipe, calibration_files=[_write(tmp_path / "calib.txt", sample_text(2))])
    assert texts.calibration is not None
    blocks = texts.calibration.shape[0]
    assert blocks < 128
    assert (
        f"Calibration used {blocks * 512:,} tokens ({blocks} blocks of 512), fewer than the 65,536 asked "
        "(num_samples 128 x seq_len 512): the text is short." in texts.warnings
    )


def test_a_model_folder_given_as_text_reads_only_its_text_files_and_says_so(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """The README's rule: .txt/.md whole, .jsonl a {"text"} per line, nothing else; the report names the rest."""
    folder = write_model_dir(tmp_path / "model")
    _write(folder / "README.md", "A short model card. " * 10)
    files = sorted(folder.iterdir())
    recipe = Recipe.model_validate({"steps": [GPTQ], "calibration": {"num_samples": 4, "seq_len": 64}})
    texts = prepare_texts(tokenizer, recipe, calibration_files=files)
    skipped = sorted(p.name for p in files if p.suffix not in {".txt", ".md", ".jsonl"})
    assert "config.json" in skipped and "model.safetensors" in skipped
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    assert texts.warnings[0] == f"The calibration files {shown} were not read: only .txt, .md and .jsonl files are."
    assert any(w.startswith("Calibration used ") for w in texts.warnings)  # the README alone is short
    assert texts.perplexity_not_measured is not None


def test_the_report_and_model_card_carry_the_shortfalls(tmp_path: Path) -> None:
    """Through the CLI's pipeline: 30 tokens of evaluation text give a null perplexity, the reason, and no
    percentage change (the number this issue once reported as -0.03 %)."""
    model = write_model_dir(tmp_path / "model")
    (tmp_path / "recipe.json").write_text(json.dumps({"steps": [QUANTIZE]}))
    evaluation = _write(tmp_path / "eval.txt", "The quick brown fox jumps over the lazy dog.")
    report = compress_local(
        model, tmp_path / "recipe.json", tmp_path / "out", evaluation=evaluation, measure_speed=False
    )
    assert report.baseline.perplexity is None and report.result.perplexity is None
    assert report.summary.perplexity_delta_pct is None
    reason = report.evaluation.not_measured_reason
    assert reason is not None and "fewer than the 2,048 a perplexity is reported from" in reason
    assert f"Perplexity was not measured: {reason}." in report.warnings
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- Perplexity was not measured: {reason}." in card
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["evaluation"]["not_measured_reason"] == reason and written["version"] == "1.1"
