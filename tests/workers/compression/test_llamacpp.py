"""GGUF files in the runtime that serves them: llama.cpp (llama-cpp-python) loads what the exporter
writes, tokenizes like transformers, scores the same perplexity as ModelPress, and the runtime
measurement reports interleaved speeds with their spread."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from app.jobs.spec import PruneStep, QuantizeStep
from tests.tiny import CORPUS, sample_text, tiny_model, tiny_tokenizer
from workers.compression.evaluate import perplexity
from workers.compression.gguf import export_gguf
from workers.compression.gguf_types import resolve_export_type
from workers.compression.llamacpp import gguf_perplexity, measure_gguf, paired_speedup
from workers.compression.prune import prune
from workers.compression.quantize import quantize
from workers.compression.weight_quant import gguf_exact_scales

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the 'gguf' extra) is not installed")

VOCAB = 512
TEXT = (
    "Don't panic: the model's 4-bit weights (GPTQ, group size 32) weigh 3.2x less than 16-bit ones!\n\n"
    "    def f(x):  return x ** 2  # indented code, tabs\tand  double  spaces\n"
    "Café, naïve, Zürich — “quotes” and emoji 😀; numbers 1234567 and 3.14159; URLs https://x.org/a?b=c."
)


def _trained(arch: str) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """A tiny model trained a few steps on the test corpus, so that perplexity means something (~5 rather
    than ~vocab size for random weights or ~1 once memorised). Returns a fresh copy of it, its tokenizer
    and 64-token windows."""
    model, tokenizer, windows = _train(arch)
    return copy.deepcopy(model), tokenizer, windows


@functools.cache
def _train(arch: str, steps: int = 20) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(VOCAB)
    model = tiny_model(arch, vocab_size=VOCAB)
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids[0]
    windows = ids[: len(ids) // 64 * 64].reshape(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, windows


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_0_perplexity_in_llama_cpp_matches_modelpress(tmp_path: Path, arch: str) -> None:
    model, tokenizer, windows = _trained(arch)
    evaluation, calibration = windows[:4], windows[4:12]
    export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")
    assert gguf_perplexity(tmp_path / "f16.gguf", evaluation, threads=1) == pytest.approx(
        perplexity(model, evaluation), rel=1e-3
    )
    step = QuantizeStep(scheme="w4a16", algorithm="gptq" if arch == "llama" else "rtn", group_size=32)
    with gguf_exact_scales():
        quantize(model, step, calibration=calibration)
    export_gguf(model, tokenizer, tmp_path / "q4_0.gguf", resolve_export_type("auto", step.model_dump()))
    ours = perplexity(model, evaluation)
    theirs = gguf_perplexity(tmp_path / "q4_0.gguf", evaluation, threads=1)
    # Same codes; llama.cpp's runtime adds only its 8-bit activations in the dot products and its fp16 KV cache.
    assert 2.0 < ours < 50.0
    assert theirs == pytest.approx(ours, rel=0.01)


def _bpe_tokenizer(pre: pre_tokenizers.PreTokenizer) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS, TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


@pytest.mark.parametrize(
    ("pre", "name"),
    [
        (pre_tokenizers.ByteLevel(add_prefix_space=False), "gpt-2"),
        (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False),
                ]
            ),
            "smollm",
        ),
        (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
            "llama-bpe",
        ),
    ],
)
def test_llama_cpp_tokenizes_like_transformers(tmp_path: Path, pre: Any, name: str) -> None:
    tokenizer = _bpe_tokenizer(pre)
    facts = export_gguf(tiny_model("llama", vocab_size=VOCAB), tokenizer, tmp_path / "m.gguf", "f16")
    assert facts["tokenizer"]["pre"] == name
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    try:
        for text in (TEXT, sample_text(2), "a\n\n\nb  c   d"):
            expected = tokenizer.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected
            assert llm.detokenize(expected).decode() == text
    finally:
        llm.close()


def test_structured_pruned_and_quantized_model_runs_in_llama_cpp(tmp_path: Path) -> None:
    model, tokenizer, windows = _trained("llama")
    model = prune(model, PruneStep(algorithm="structured", targets={"heads": 0.5, "mlp": 0.3})).model
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size % 32  # uneven MLP width
    with gguf_exact_scales():  # down_proj's input width is no multiple of 32: it stays out of the groups
        quantize(model, QuantizeStep(scheme="w4a16", group_size=32, ignore=["lm_head", "re:.*down_proj"]))
    facts = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0")
    assert facts["carried_tensors"] == 12 and facts["tensor_types"]["F16"] == 2  # ffn_down falls back to F16
    evaluation = windows[:4]
    assert gguf_perplexity(tmp_path / "m.gguf", evaluation, threads=1) == pytest.approx(
        perplexity(model, evaluation), rel=0.01
    )
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, verbose=False)
    try:
        prompt = windows[0, :16].tolist()
        generated = [int(t) for _, t in zip(range(8), llm.generate(prompt, top_k=1, temp=0.0), strict=False)]
    finally:
        llm.close()
    with torch.no_grad():
        expected = model.generate(windows[:1, :16], max_new_tokens=8, do_sample=False)[0, 16:].tolist()
    assert generated == expected


def test_measure_gguf_times_both_files_interleaved(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("qwen2", vocab_size=VOCAB), tiny_tokenizer(VOCAB)
    export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")
    with gguf_exact_scales():
        quantize(model, QuantizeStep(scheme="w8a16", group_size=32))
    export_gguf(model, tokenizer, tmp_path / "q8_0.gguf", "q8_0")
    windows = tokenizer(sample_text(), return_tensors="pt").input_ids[0][:128].reshape(2, 64)
    seen: list[str] = []
    report = measure_gguf(
        tmp_path / "q8_0.gguf", tmp_path / "f16.gguf", windows, threads=1, rounds=3, decode_tokens=8,
        prefill_tokens=16, callbacks=_recording(seen),
    )  # fmt: skip
    assert report["rounds"] == 3 and report["eval_windows"] == 2 and report["prefill_tokens"] == 16
    for role in ("result", "baseline"):
        side = report[role]
        assert side["file_bytes"] == (tmp_path / f"{'q8_0' if role == 'result' else 'f16'}.gguf").stat().st_size
        assert math.isfinite(side["perplexity"])
        for key in ("prefill_tok_s", "decode_tok_s", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s"):
            assert 0 < side[key]["min"] <= side[key]["median"] <= side[key]["max"]
    speedup = report["decode_speedup"]
    assert speedup["significant"] == (not speedup["min"] <= 1.0 <= speedup["max"])
    assert report["size_ratio"] > 1.5
    assert sum("speed round" in m for m in seen) == 3 and sum("perplexity window" in m for m in seen) == 4


def _recording(seen: list[str]) -> Any:
    from workers.compression.base import Callbacks

    return Callbacks(progress=lambda _f, message: seen.append(message))


def test_a_speedup_whose_spread_contains_one_is_not_significant() -> None:
    base = [{"decode_tok_s": 100.0}, {"decode_tok_s": 100.0}, {"decode_tok_s": 100.0}]
    noisy = [{"decode_tok_s": v} for v in (95.0, 130.0, 120.0)]
    clear = [{"decode_tok_s": v} for v in (180.0, 210.0, 190.0)]
    assert paired_speedup(noisy, base, "decode_tok_s") == {"median": 1.2, "min": 0.95, "max": 1.3, "significant": False}
    assert paired_speedup(clear, base, "decode_tok_s")["significant"] is True


def test_k_quant_export_is_llama_cpp_s_own_quantizer(tmp_path: Path) -> None:
    model = tiny_model("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, head_dim=64)
    facts = export_gguf(copy.deepcopy(model), tiny_tokenizer(VOCAB), tmp_path / "m.gguf", "q4_k_m")
    assert facts["file_type"] == "MOSTLY_Q4_K_M" and facts["tensor_types"]["Q4_K"] > 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    # llama-quantize's Q4_K_M keeps 6 bits in some layers' attn_v (here the last of two: use_more_bits).
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=32, verbose=False).close()
