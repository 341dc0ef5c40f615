"""Tiny real models and tokenizers built from configs, for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model learns patterns from text. "
    "Compression makes models smaller and faster while keeping their quality. "
    "Quantization stores weights in fewer bits; pruning removes weights; distillation teaches a student. "
) * 4


def sample_text(repeats: int = 20) -> str:
    """Deterministic English-ish text for calibration/evaluation in tests."""
    return "\n".join(f"{i}: {CORPUS}" for i in range(repeats))


def tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, wrapped for transformers."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(arch: str = "llama", **overrides: object) -> PretrainedConfig:
    """A 2-layer config with GQA (4 query heads, 2 KV heads), hidden 64."""
    common: dict[str, object] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    # Llama's module names, other wiring: a (1 + w) RMSNorm (Gemma), one norm feeding a parallel
    # attention + MLP block (Phi).
    if arch == "gemma":
        return GemmaConfig(**{"head_dim": 16, **common})
    if arch == "phi":
        return PhiConfig(**common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A randomly initialised tiny causal LM in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()


def write_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Save a tiny model + tokenizer as a Hugging Face directory (safetensors, config, tokenizer files)."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, seed, **overrides).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path
