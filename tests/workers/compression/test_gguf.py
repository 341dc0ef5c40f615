"""GGUF export: the carried codes are bit-exact under llama.cpp's own dequantization (``gguf.quants``),
full-precision tensors follow the documented policy, and the submission rules refuse what cannot be
carried. Runtime checks (llama.cpp loading the files) are in ``test_llamacpp.py``."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers

from app.jobs.spec import QuantizeStep
from tests.tiny import sample_text, tiny_model, tiny_tokenizer
from workers.compression.base import EngineError
from workers.compression.gguf import export_gguf, pre_tokenizer_name
from workers.compression.gguf_types import resolve_export_type
from workers.compression.quantize import quantize
from workers.compression.recipe import ExportStep
from workers.compression.weight_quant import gguf_exact_scales

VOCAB = 512  # the tiny tokenizer learns ~150 merges below this


def _calibration(tokenizer: object, n: int = 4, seq: int = 32) -> torch.Tensor:
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids[0]  # type: ignore[operator]
    return ids[: n * seq].reshape(n, seq)


def _quantized(arch: str, step: QuantizeStep, **overrides: object) -> tuple[torch.nn.Module, object]:
    model = tiny_model(arch, vocab_size=VOCAB, **overrides)
    tokenizer = tiny_tokenizer(VOCAB)
    with gguf_exact_scales():
        quantize(model, step, calibration=_calibration(tokenizer) if step.calibration_reason else None)
    return model, tokenizer


def _unpermute(name: str, rows: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (pairs) back to transformers' halves, for Llama tensors."""
    part = name.split(".")[2] if name.startswith("blk.") else ""
    if model.config.model_type != "llama" or part not in ("attn_q", "attn_k"):
        return rows
    heads = model.config.num_attention_heads if part == "attn_q" else model.config.num_key_value_heads
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _hf_name(name: str) -> str:
    parts = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }  # fmt: skip
    if name.startswith("blk."):
        _, index, part, suffix = name.split(".")
        return f"model.layers.{index}.{parts[part]}.{suffix}"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(
        name, "lm_head.weight"
    )


def _read(path: Path, model: torch.nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of a GGUF file dequantized by ``gguf.quants``, in transformers' names and row order."""
    out = {}
    for tensor in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        values = _unpermute(tensor.name, values.reshape(tuple(reversed([int(d) for d in tensor.shape]))), model)
        out[_hf_name(tensor.name)] = (tensor.tensor_type.name, torch.from_numpy(np.array(values)))
    return out


def _assert_carried(path: Path, model: torch.nn.Module, qtype: str) -> None:
    tensors = _read(path, model)
    linears = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    assert linears
    for name in linears:
        kind, values = tensors[f"{name}.weight"]
        assert kind == qtype, name
        assert torch.equal(values, model.get_submodule(name).weight.detach().float()), name  # bit for bit


@pytest.mark.parametrize(
    ("arch", "step", "qtype"),
    [
        ("llama", QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32), "Q4_0"),
        ("qwen2", QuantizeStep(scheme="w4a16", algorithm="rtn", group_size=32), "Q4_0"),
        ("qwen2", QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32, symmetric=False), "Q4_1"),
        ("llama", QuantizeStep(scheme="w4a16", algorithm="rtn", group_size=64, symmetric=False), "Q4_1"),
        ("llama", QuantizeStep(scheme="w8a16", algorithm="gptq", group_size=32), "Q8_0"),
        ("qwen2", QuantizeStep(scheme="w8a16", algorithm="rtn"), "Q8_0"),  # per channel: 32-blocks share a scale
    ],
)
def test_auto_carries_the_quantize_codes_bit_exactly(tmp_path: Path, arch: str, step: QuantizeStep, qtype: str) -> None:
    model, tokenizer = _quantized(arch, step)
    gguf_type = resolve_export_type("auto", step.model_dump())
    assert gguf_type == qtype.lower()
    facts = export_gguf(model, tokenizer, tmp_path / "model.gguf", gguf_type)
    _assert_carried(tmp_path / "model.gguf", model, qtype)
    assert facts["carried_tensors"] == 14  # 7 Linears x 2 layers; lm_head is ignored by default
    assert facts["file_bytes"] == (tmp_path / "model.gguf").stat().st_size


def test_full_precision_tensors_follow_the_llama_cpp_policy(tmp_path: Path) -> None:
    model, tokenizer = _quantized(
        "llama", QuantizeStep(scheme="w4a16", group_size=32, ignore=["lm_head", "re:.*v_proj"])
    )
    facts = export_gguf(model, tokenizer, tmp_path / "a.gguf", "q4_0")
    tensors = _read(tmp_path / "a.gguf", model)
    assert tensors["lm_head.weight"][0] == "Q8_0"  # the output matrix keeps 8 bits, as llama-quantize's Q4_0
    assert tensors["model.embed_tokens.weight"][0] == "Q4_0"  # untied embedding: the file's type
    assert tensors["model.layers.0.self_attn.v_proj.weight"][0] == "Q4_0"  # ignored: re-quantized, reported
    assert tensors["model.norm.weight"][0] == "F32"
    assert facts["quantized_tensors"]["blk.1.attn_v.weight"] == "Q4_0"
    # The re-quantized ones are llama.cpp's own reference quantizer applied to the float weights.
    v = model.get_submodule("model.layers.0.self_attn.v_proj").weight.detach().float().numpy()
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0
    )
    assert np.array_equal(tensors["model.layers.0.self_attn.v_proj.weight"][1].numpy(), expected)

    export_gguf(model, tokenizer, tmp_path / "b.gguf", "q4_0", full_precision="q8_0")
    tensors = _read(tmp_path / "b.gguf", model)
    assert {tensors[n][0] for n in ("lm_head.weight", "model.embed_tokens.weight")} == {"Q8_0"}
    assert tensors["model.layers.1.self_attn.v_proj.weight"][0] == "Q8_0"
    assert tensors["model.layers.1.self_attn.q_proj.weight"][0] == "Q4_0"


def test_tied_embedding_is_written_once_at_8_bits(tmp_path: Path) -> None:
    model, tokenizer = _quantized("qwen2", QuantizeStep(scheme="w4a16", group_size=32), tie_word_embeddings=True)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0")
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "Q8_0"
    assert names["blk.0.attn_q.bias"] == "F32"  # Qwen2's qkv biases


def test_f16_export_of_a_float_model(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama", vocab_size=VOCAB), tiny_tokenizer(VOCAB)
    assert resolve_export_type("auto", None) == "f16"
    facts = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert facts["tensor_types"] == {"F16": 16, "F32": 5} and facts["carried_tensors"] == 0
    for name, (kind, values) in _read(tmp_path / "m.gguf", model).items():
        expected = model.state_dict()[name].float()
        assert torch.equal(values, expected.half().float() if kind == "F16" else expected), name


def test_scales_that_are_no_float16_values_are_refused(tmp_path: Path) -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    quantize(model, QuantizeStep(scheme="w4a16", group_size=32))  # without gguf_exact_scales()
    with pytest.raises(EngineError, match="gguf_exact_scales"):
        export_gguf(model, tiny_tokenizer(VOCAB), tmp_path / "m.gguf", "q4_0")


def test_exact_scales_change_the_quantization_only_slightly() -> None:
    step = QuantizeStep(scheme="w4a16", group_size=32, symmetric=False)
    plain = tiny_model("llama", vocab_size=VOCAB)
    quantize(plain, step)
    exact, _ = _quantized("llama", step)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        a, b = plain.get_submodule(name), exact.get_submodule(name)
        scale = b.weight_scale.detach().float()
        assert torch.equal(scale.half().float(), scale)
        assert not torch.equal(a.weight_scale, b.weight_scale)  # the default path is untouched
        assert torch.allclose(a.weight_scale, b.weight_scale, rtol=2**-7)
        error = (b.weight - a.weight).detach().norm() / a.weight.detach().norm()
        assert float(error) < 0.05


def test_resolve_export_type_refusals_name_the_fields() -> None:
    w4 = QuantizeStep(scheme="w4a16", group_size=128).model_dump()
    assert resolve_export_type("auto", w4) == "q4_0"  # g128 = four Q4_0 blocks sharing one scale: exact
    assert resolve_export_type("q4_k_m", w4) == "q4_k_m"
    with pytest.raises(ValueError, match=r"symmetric false .* Q8_0 has no zero-point"):
        resolve_export_type("auto", QuantizeStep(scheme="w8a16", symmetric=False).model_dump())
    with pytest.raises(ValueError, match=r"fp8 .*type f16, bf16 or q8_0"):
        resolve_export_type("auto", QuantizeStep(scheme="fp8").model_dump())
    with pytest.raises(ValueError, match="group_size 48"):
        resolve_export_type("auto", {"scheme": "w4a16", "group_size": 48, "symmetric": True})
    with pytest.raises(ValueError, match="'q3_k' is not a GGUF type"):
        resolve_export_type("q3_k", None)
    assert ExportStep.model_validate({"method": "export", "format": "gguf"}).type == "auto"


def test_pre_tokenizer_names_follow_the_tokenizer_structure() -> None:
    def spec(pre: object) -> dict[str, object]:
        tok = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
        tok.pre_tokenizer = pre
        import json

        return json.loads(tok.to_str())["pre_tokenizer"]

    assert pre_tokenizer_name(spec(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    digits = pre_tokenizers.Digits(individual_digits=True)
    assert (
        pre_tokenizer_name(spec(pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])))
        == "smollm"
    )
    with pytest.raises(EngineError, match="add_prefix_space"):  # llama.cpp never prepends a space
        pre_tokenizer_name(spec(pre_tokenizers.ByteLevel(add_prefix_space=True)))
    with pytest.raises(EngineError, match=r"no llama\.cpp equivalent"):
        pre_tokenizer_name(spec(pre_tokenizers.Whitespace()))


def test_tokenizer_metadata_is_complete(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama", vocab_size=VOCAB), tiny_tokenizer(VOCAB)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    facts = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields

    def text(key: str) -> str:
        field = fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("tokenizer.ggml.model") == "gpt2" and text("tokenizer.ggml.pre") == "gpt-2"
    assert text("tokenizer.chat_template") == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert len(fields["tokenizer.ggml.merges"].data) == facts["tokenizer"]["merges"] > 100
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert eos == tokenizer.eos_token_id


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="supports llama, qwen2"):
        export_gguf(tiny_model("phi", vocab_size=VOCAB), tiny_tokenizer(VOCAB), tmp_path / "m.gguf", "f16")
