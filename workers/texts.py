"""A job's texts: calibration, evaluation and training files tokenised into what the engines take, with the
held-out slice for perplexity, and a warning for every way the text fell short of what the recipe asked.

Which files are read (the rule the README states for uploads): ``.txt`` and ``.md`` files whole, ``.jsonl``
files one ``{"text": ...}`` object a line (:data:`workers.compression.data.TEXT_SUFFIXES`); other files are
skipped, and the report says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.compression.base import EngineError
from workers.compression.data import TEXT_SUFFIXES, pack_blocks, read_texts, tokenize_stream
from workers.compression.evaluate import MIN_PERPLEXITY_TOKENS
from workers.compression.recipe import CalibrationOptions, Recipe

HELD_OUT_FRACTION = 0.1
"""Share of the calibration/training stream held out for perplexity when no evaluation text is given."""

DEFAULT_EVAL_SEQ_LEN = 512
DEFAULT_EVAL_MAX_TOKENS = 65536


@dataclass
class JobTexts:
    """The tokenised texts of one job, and what a reader of its report should know about them."""

    calibration: torch.Tensor | None
    train_stream: torch.Tensor | None
    eval_ids: torch.Tensor | None
    eval_source: str
    warnings: list[str] = field(default_factory=list)
    perplexity_not_measured: str | None = None

    def evaluation_info(self) -> dict[str, Any]:
        """What the perplexity was measured on (report.json ``evaluation``)."""
        return {
            "source": self.eval_source,
            "seq_len": int(self.eval_ids.shape[1]) if self.eval_ids is not None else None,
            "tokens": int(self.eval_ids.numel()) if self.eval_ids is not None else 0,
            "not_measured_reason": self.perplexity_not_measured,
        }


SOURCE_TEXT = {
    "evaluation": "evaluation text",
    "calibration_heldout": "held-out slice of the calibration text",
    "training_heldout": "held-out slice of the training text",
}


def skipped_files_warning(kind: str, files: Sequence[Path]) -> str | None:
    """A warning naming the files of ``kind`` text that are not read (by their suffix), or None."""
    skipped = sorted(p.name for p in files if p.suffix not in TEXT_SUFFIXES)
    if not skipped:
        return None
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return f"The {kind} files {shown} were not read: only .txt, .md and .jsonl files are."


def _stream(tokenizer: Any, files: Sequence[Path]) -> torch.Tensor | None:
    return tokenize_stream(tokenizer, read_texts(files)) if files else None


def prepare_texts(
    tokenizer: Any,
    recipe: Recipe,
    calibration_files: Sequence[Path] = (),
    evaluation_files: Sequence[Path] = (),
    training_files: Sequence[Path] = (),
) -> JobTexts:
    """Tokenise the job's texts; hold out the last :data:`HELD_OUT_FRACTION` of the calibration (else
    training) stream for perplexity when no evaluation text was given and the slice is long enough to score."""
    given = {"calibration": calibration_files, "evaluation": evaluation_files, "training": training_files}
    warnings = [w for kind, paths in given.items() if (w := skipped_files_warning(kind, paths)) is not None]
    calib_stream, train_stream = _stream(tokenizer, calibration_files), _stream(tokenizer, training_files)
    if recipe.needs_calibration and calib_stream is None:
        raise EngineError("a step needs calibration text, but none was given")
    texts = JobTexts(calibration=None, train_stream=train_stream, eval_ids=None, eval_source="none", warnings=warnings)
    if evaluation_files:
        _set_evaluation(texts, recipe, tokenize_stream(tokenizer, read_texts(evaluation_files)), "evaluation")
    elif (held_from := calib_stream if calib_stream is not None else train_stream) is not None:
        cut = int(held_from.numel() * (1 - HELD_OUT_FRACTION))
        kind = "calibration" if calib_stream is not None else "training"
        if _set_evaluation(texts, recipe, held_from[cut:], f"{kind}_heldout"):
            # The held-out slice is never used for calibration/training.
            if calib_stream is not None:
                calib_stream = calib_stream[:cut]
            else:
                texts.train_stream = held_from[:cut]
    else:
        texts.perplexity_not_measured = "no evaluation, calibration or training text was given"
    if calib_stream is not None:
        texts.calibration = _calibration_blocks(calib_stream, recipe, texts.warnings)
    return texts


def _set_evaluation(texts: JobTexts, recipe: Recipe, stream: torch.Tensor, source: str) -> bool:
    """Evaluation windows from ``stream`` (capped at ``max_tokens``) if they reach
    :data:`~workers.compression.evaluate.MIN_PERPLEXITY_TOKENS`; otherwise none, and the reason why."""
    options = recipe.evaluation
    seq_len = options.seq_len if options else recipe.calibration.seq_len if recipe.calibration else DEFAULT_EVAL_SEQ_LEN
    max_tokens = options.max_tokens if options else DEFAULT_EVAL_MAX_TOKENS
    usable = stream[:max_tokens]
    scored = (usable.numel() // seq_len) * seq_len if usable.numel() >= seq_len else usable.numel()
    if scored < MIN_PERPLEXITY_TOKENS:
        texts.perplexity_not_measured = (
            f"the {SOURCE_TEXT[source]} gives {scored:,} tokens to score, fewer than the "
            f"{MIN_PERPLEXITY_TOKENS:,} a perplexity is reported from"
        )
        return False
    if usable.numel() < seq_len:  # max_tokens is a cap; the window length is what was asked
        texts.warnings.append(
            f"Perplexity was scored in one window of {usable.numel():,} tokens, shorter than the seq_len "
            f"{seq_len:,} asked: the {SOURCE_TEXT[source]} is short."
        )
    texts.eval_ids = pack_blocks(usable, min(seq_len, usable.numel()))
    texts.eval_source = source
    return True


def _calibration_blocks(stream: torch.Tensor, recipe: Recipe, warnings: list[str]) -> torch.Tensor:
    """``num_samples`` blocks of ``seq_len`` tokens (the documented defaults without a "calibration" block);
    fewer, or shorter blocks, when the text is short, with a warning that says so."""
    options = recipe.calibration or CalibrationOptions()
    seq_len = min(options.seq_len, stream.numel())
    blocks = pack_blocks(stream, seq_len, options.num_samples)
    asked = options.num_samples * options.seq_len
    if blocks.numel() < asked:
        warnings.append(
            f"Calibration used {blocks.numel():,} tokens ({blocks.shape[0]} block{'s' if blocks.shape[0] > 1 else ''} "
            f"of {seq_len}), fewer than the "
            f"{asked:,} asked (num_samples {options.num_samples} x seq_len {options.seq_len}): the text is short."
        )
    return blocks
