"""The GGUF exporter: one ``model.gguf`` that llama.cpp runs with nothing else.

``export_gguf(model, tokenizer, path, "q4_0")`` writes the architecture metadata, the tokenizer (as
llama.cpp's GPT-2 style byte-level BPE vocab, with merges, special tokens and chat template) and
every tensor, with the ``gguf`` package (llama.cpp's own writer library).

Tensors
-------
* Linears a quantize step left quantized (compressed-tensors scheme attached, ``weight`` holding
  the quantize-dequantized values): their integer codes ``round(weight / scale) + zero_point`` and
  scales are **carried** into ``Q4_0`` / ``Q4_1`` / ``Q8_0`` blocks with no re-rounding where the
  layout allows (see :mod:`workers.compression.gguf_types`). Each carried tensor is dequantized
  again with ``gguf.quants`` (llama.cpp's reference) and compared with the model's weight: the
  export fails rather than write a file that differs from the model ModelPress measured.
* The full-precision matrices (token embedding, ``lm_head``, ignored Linears) follow the step's
  ``full_precision`` policy. ``"llama.cpp"`` mirrors ``llama-quantize``: the output matrix (or the
  tied token embedding that serves as it) is kept at 8 bits (``Q8_0``; llama-quantize picks ``Q6_K``
  where the row width is a multiple of 256 and ``Q8_0`` otherwise, and the ``gguf`` package has no
  ``Q6_K`` quantizer), every other matrix gets the file's type, re-quantized by the ``gguf``
  package's reference quantizer (bit-exact with ggml's ``quantize_row_*_ref``, i.e. with
  llama-quantize without an importance matrix). Rows whose width is not a multiple of the block
  size stay ``F16``, as in llama-quantize. Norms and biases are ``F32``, as in llama.cpp's converter.
* Llama's Q and K rows are permuted as llama.cpp's converter does (llama.cpp applies RoPE to
  adjacent pairs, transformers to the two halves of each head); a row permutation moves whole
  blocks, so carried codes stay carried.

The K-quant types (``q4_k_m``, ``q5_k_m``, ``q6_k``) are made by llama.cpp's own quantizer
(``llama_model_quantize`` from llama-cpp-python) from an ``F16`` export.
"""

from __future__ import annotations

import ctypes
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from workers.compression.base import Callbacks, EngineError
from workers.compression.gguf_types import K_QUANT_TYPES

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
QTYPES = {
    "f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0,
    "q5_1": QType.Q5_1, "q5_0": QType.Q5_0, "q4_1": QType.Q4_1, "q4_0": QType.Q4_0,
}  # fmt: skip
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}  # fmt: skip
CARRIED = (QType.Q8_0, QType.Q4_1, QType.Q4_0)
QK = 32  # weights per Q4_0 / Q4_1 / Q8_0 / Q5_x block (ggml's QK4_0 = QK8_0 = 32)
_QPARAM_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_g_idx", "input_scale", "input_zero_point")


@dataclass
class _Tensor:
    """One GGUF tensor to write: its name, type and a function producing its data (rows in numpy order)."""

    name: str
    source: str
    qtype: QType
    shape: tuple[int, ...]
    how: str  # "carried" | "quantized" | "float"
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        if self.qtype in (QType.F32, QType.F16):
            return int(np.prod(self.shape)) * (4 if self.qtype == QType.F32 else 2)
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    out_path: str | Path,
    gguf_type: str,
    *,
    full_precision: str = "llama.cpp",
    callbacks: Callbacks | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a transformers Llama/Qwen2 model, possibly quantized in place by
    :func:`workers.compression.quantize.quantize`) and ``tokenizer`` as one GGUF file at ``out_path``.

    ``gguf_type`` is a concrete type from :func:`workers.compression.gguf_types.resolve_export_type`
    (never ``"auto"``). Returns facts for the report. Raises :class:`EngineError` for models,
    tokenizers or codes it cannot write faithfully. Cancellation is checked between tensors.
    """
    callbacks = callbacks or Callbacks()
    started = time.perf_counter()
    out_path = Path(out_path)
    if gguf_type in K_QUANT_TYPES:
        return _export_k_quant(model, tokenizer, out_path, gguf_type, callbacks, started)
    if gguf_type not in QTYPES:
        raise EngineError(f"GGUF type {gguf_type!r} cannot be written here; resolve 'auto' first")
    config: Any = model.config
    arch = _architecture(config)
    plan = _plan(model, arch, QTYPES[gguf_type], full_precision)
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hyperparameters(writer, config, arch, gguf_type)
        tokenizer_facts = _add_tokenizer(writer, tokenizer, int(config.vocab_size))
        for t in plan:
            dtype = {QType.F32: np.float32, QType.F16: np.float16}.get(t.qtype, np.uint8)
            shape = t.shape if dtype is not np.uint8 else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, shape, np.dtype(dtype), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, t in enumerate(plan):
            callbacks.check()
            writer.write_tensor_data(t.make())
            callbacks.progress((index + 1) / len(plan), f"gguf tensor {index + 1}/{len(plan)}")
    finally:
        writer.close()
    return {
        "format": "gguf",
        "type": gguf_type,
        "file_type": FILE_TYPES[gguf_type].name,
        "architecture": gguf.MODEL_ARCH_NAMES[arch],
        "file_bytes": out_path.stat().st_size,
        "tensor_types": dict(Counter(t.qtype.name for t in plan)),
        "carried_tensors": sum(t.how == "carried" for t in plan),
        "quantized_tensors": {t.name: t.qtype.name for t in plan if t.how == "quantized"},
        "full_precision_policy": full_precision,
        "tokenizer": tokenizer_facts,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _architecture(config: Any) -> gguf.MODEL_ARCH:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise EngineError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {model_type!r}")
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------- which tensor gets which type


def _plan(model: nn.Module, arch: gguf.MODEL_ARCH, file_qtype: QType, policy: str) -> list[_Tensor]:
    """Every GGUF tensor of ``model`` in file order, each with its type and how its data is made."""
    config: Any = model.config
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    plan: list[_Tensor] = []
    for source, tensor in model.state_dict(keep_vars=True).items():
        if source.endswith(_QPARAM_SUFFIXES) or (tied and source == "lm_head.weight"):
            continue
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EngineError(f"tensor {source} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        module = modules.get(source.rsplit(".", 1)[0])
        permute = _rope_permutation(config, arch, name)
        plan.append(_plan_tensor(source, name, tensor.detach(), module, file_qtype, policy, tied, permute))
    return plan


def _plan_tensor(
    source: str,
    name: str,
    tensor: torch.Tensor,
    module: nn.Module | None,
    file_qtype: QType,
    policy: str,
    tied: bool,
    permute: Callable[[np.ndarray], np.ndarray],
) -> _Tensor:
    shape = tuple(tensor.shape)
    if tensor.ndim == 1:  # norms and biases: F32, as llama.cpp's converter keeps every 1-D tensor
        return _Tensor(name, source, QType.F32, shape, "float", lambda: permute(_float_rows(tensor)))
    scheme = getattr(module, "quantization_scheme", None) if source.endswith(".weight") else None
    if scheme is not None and file_qtype in CARRIED and _carriable(module, file_qtype):
        assert module is not None
        return _Tensor(name, source, file_qtype, shape, "carried", lambda: permute(carry(module, file_qtype)))
    qtype = _full_precision_type(name, file_qtype, policy, tied)
    if qtype in (QType.F32, QType.F16, QType.BF16) or shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = qtype if qtype in (QType.F32, QType.F16, QType.BF16) else QType.F16
        return _Tensor(name, source, qtype, shape, "float", lambda: permute(_encode(_float_rows(tensor), qtype)))
    return _Tensor(name, source, qtype, shape, "quantized", lambda: permute(_encode(_float_rows(tensor), qtype)))


def _full_precision_type(name: str, file_qtype: QType, policy: str, tied: bool) -> QType:
    """The type of a matrix the recipe left in full precision (or one the file type re-quantizes)."""
    if policy == "f16":
        return QType.F16 if file_qtype not in (QType.F32, QType.BF16) else file_qtype
    if file_qtype in (QType.F32, QType.F16, QType.BF16):
        return file_qtype
    if policy == "q8_0":
        return QType.Q8_0
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    return QType.Q8_0 if is_output else file_qtype


def _rope_permutation(config: Any, arch: gguf.MODEL_ARCH, name: str) -> Callable[[np.ndarray], np.ndarray]:
    """Llama's Q/K rows reordered from transformers' rotate-half RoPE to llama.cpp's adjacent pairs (the
    converter's ``LlamaModel.permute``); the identity for everything else and for Qwen2 (NeoX RoPE)."""
    if arch != gguf.MODEL_ARCH.LLAMA or not name.startswith("blk.") or name.split(".")[2] not in ("attn_q", "attn_k"):
        return lambda rows: rows
    heads = int(config.num_attention_heads if name.split(".")[2] == "attn_q" else config.num_key_value_heads)

    def permute(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(
            rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
        )

    return permute


def _float_rows(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _encode(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """Float rows in ``qtype`` by the ``gguf`` package (llama.cpp's reference quantizers)."""
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)


# ---------------------------------------------------------------- carrying a quantize step's codes


@dataclass
class _Codes:
    """A quantized Linear's integer codes per weight and its per-32-block scale and zero-point."""

    codes: torch.Tensor  # int32 [rows, cols]: round(w / s) + zp, what compressed-tensors packs
    scale: torch.Tensor  # float32 [rows, cols / 32]
    zero_point: torch.Tensor  # int32 [rows, cols / 32]
    bits: int


def integer_codes(module: nn.Module) -> _Codes:
    """The codes and qparams of a Linear quantized by compressed-tensors, recovered exactly from its
    quantize-dequantized ``weight`` (``(q - zp) · s`` in the weight's dtype), per 32-column block."""
    args: Any = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if args is None or str(args.type) != "int" or getattr(module, "weight_g_idx", None) is not None:
        raise EngineError("only integer weights without activation-order indices can be carried")
    weight = _param(module, "weight").to(torch.float32)
    rows, cols = weight.shape
    scale = _param(module, "weight_scale").to(torch.float32).reshape(rows, -1)
    zp_param = getattr(module, "weight_zero_point", None)
    zero = (
        zp_param.detach().cpu().to(torch.float32).reshape(rows, -1)
        if zp_param is not None and not args.symmetric
        else torch.zeros_like(scale)
    )
    per = cols // scale.shape[1]
    if per * scale.shape[1] != cols or per % QK:
        raise EngineError(f"groups of {per} columns do not split into GGUF blocks of {QK}")
    codes = torch.round(weight / scale.repeat_interleave(per, 1)) + zero.repeat_interleave(per, 1)
    q_min, q_max = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    if bool((codes < q_min).any() or (codes > q_max).any()):
        raise EngineError("weight values lie outside the quantization grid of their scales")
    return _Codes(
        codes=codes.to(torch.int32),
        scale=scale.repeat_interleave(per // QK, 1),
        zero_point=zero.repeat_interleave(per // QK, 1).to(torch.int32),
        bits=int(args.num_bits),
    )


def _param(module: nn.Module, name: str) -> torch.Tensor:
    """A module's tensor in host memory, wherever the model computes: GGUF blocks are built by numpy."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach().cpu()


def _carriable(module: nn.Module | None, qtype: QType) -> bool:
    """Whether ``module``'s scheme fits ``qtype``'s blocks (the codes are checked again when carried)."""
    args: Any = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    weight = getattr(module, "weight", None)
    if args is None or weight is None or str(args.type) != "int" or weight.shape[-1] % QK:
        return False
    if getattr(module, "weight_g_idx", None) is not None:
        return False
    if qtype == QType.Q8_0:
        return args.symmetric or args.num_bits == 4  # int4 (q - zp) is within int8
    if qtype == QType.Q4_0:
        return bool(args.symmetric) and args.num_bits == 4
    return args.num_bits == 4  # Q4_1


def carry(module: nn.Module, qtype: QType) -> np.ndarray:
    """``module``'s codes as ``qtype`` blocks (uint8 ``[rows, bytes]``), checked against its weight by
    dequantizing them with ``gguf.quants``; :class:`EngineError` if a scale is no float16 value."""
    c = integer_codes(module)
    rows, cols = c.codes.shape
    d = c.scale.to(torch.float16)
    if not torch.equal(d.to(torch.float32), c.scale):
        raise EngineError(
            "weight scales are not float16 values, so GGUF blocks cannot hold them exactly: quantize "
            "under workers.compression.weight_quant.gguf_exact_scales() when a GGUF export follows"
        )
    codes = c.codes.reshape(rows, cols // QK, QK)
    d_bytes = d.numpy().view(np.uint8).reshape(rows, cols // QK, 2)
    if qtype == QType.Q8_0:
        values = (codes - c.zero_point.unsqueeze(-1)).numpy().astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d_bytes, values], axis=-1)
    else:
        nibbles = (codes + 8).numpy().astype(np.uint8)  # int4 codes -8..7 as 0..15
        packed = nibbles[..., :16] | (nibbles[..., 16:] << np.uint8(4))
        parts = [d_bytes, packed]
        if qtype == QType.Q4_1:
            m = -(c.zero_point.to(torch.float32) + 8) * c.scale
            m16 = m.to(torch.float16)
            if not torch.equal(m16.to(torch.float32), m):
                raise EngineError("Q4_1 block minima are not float16 values: quantize under gguf_exact_scales()")
            parts.insert(1, m16.numpy().view(np.uint8).reshape(rows, cols // QK, 2))
        blocks = np.concatenate(parts, axis=-1)
    out = np.ascontiguousarray(blocks.reshape(rows, -1))
    _check_carried(out, qtype, module)
    return out


def _check_carried(blocks: np.ndarray, qtype: QType, module: nn.Module) -> None:
    """The blocks, dequantized by llama.cpp's reference code, must give the model's weight exactly."""
    weight = _param(module, "weight")
    restored = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).to(weight.dtype)
    if not torch.equal(restored, weight):
        worst = float((restored.float() - weight.float()).abs().max())
        raise EngineError(f"GGUF {qtype.name} blocks differ from the quantized weight (max {worst:.3g})")


# ---------------------------------------------------------------- metadata and tokenizer


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Any, arch: gguf.MODEL_ARCH, gguf_type: str) -> None:
    """The keys llama.cpp's loader reads for a Llama/Qwen2 model (as the converter writes them)."""
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"))
    if rope_type not in ("default", "linear"):
        raise EngineError(f"RoPE scaling {rope_type!r} is not supported by the GGUF export yet")
    writer.add_name(str(getattr(config, "_name_or_path", "") or "modelpress-model"))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_key_length(head_dim)  # explicit: structured pruning makes hidden / heads differ from it
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# tokenizer.json pre-tokenizer regexes (as transformers writes them) and llama.cpp's name for each.
_SPLIT_PRETOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level tokenizer.json pre-tokenizer.

    Read off the pre-tokenizer's structure rather than by hashing encodings as llama.cpp's converter
    does; a tokenization test against transformers checks the choice.
    """
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        # llama.cpp's BPE never prepends a space; transformers would, and every first word would differ.
        raise EngineError("a ByteLevel pre-tokenizer with add_prefix_space has no llama.cpp equivalent")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_PRETOKENIZERS.get(steps[0].get("pattern", {}).get("Regex", ""))
        if name is not None:
            return name
    raise EngineError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent known here")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The vocab as llama.cpp's ``gpt2`` (byte-level BPE) model, whatever ``byte_fallback`` says: llama.cpp's
    SentencePiece path would need ``▁``-normalised tokens, which a byte-level vocab does not have."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EngineError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "BPE":
        raise EngineError(f"GGUF export supports byte-level BPE tokenizers, not {spec['model'].get('type')}")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges)}


def _vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, as llama.cpp's converter lists them (``get_vocab_base``)."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise EngineError(f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if decoder[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# ---------------------------------------------------------------- K-quants: llama.cpp's own quantizer


def _export_k_quant(
    model: nn.Module, tokenizer: Any, out_path: Path, gguf_type: str, callbacks: Callbacks, started: float
) -> dict[str, Any]:
    """An F16 export re-quantized by ``llama_model_quantize`` (llama-cpp-python) to a K-quant mix."""
    from workers.compression.llamacpp import load_llama_cpp

    llama_cpp = load_llama_cpp()
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        f16 = Path(tmp) / "f16.gguf"
        facts = export_gguf(model, tokenizer, f16, "f16", callbacks=callbacks.scaled(0.0, 0.5))
        callbacks.check()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(FILE_TYPES[gguf_type])
        params.nthread = max(torch.get_num_threads(), 1)
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out_path).encode(), ctypes.byref(params)) != 0:
            raise EngineError(f"llama.cpp could not quantize the model to {gguf_type}")
    callbacks.progress(1.0, f"quantized to {gguf_type} by llama.cpp")
    reader = gguf.GGUFReader(out_path)
    return {
        **facts,
        "type": gguf_type,
        "file_type": FILE_TYPES[gguf_type].name,
        "file_bytes": out_path.stat().st_size,
        "tensor_types": dict(Counter(QType(int(t.tensor_type)).name for t in reader.tensors)),
        "carried_tensors": 0,
        "quantized_tensors": {t.name: QType(int(t.tensor_type)).name for t in reader.tensors if len(t.shape) > 1},
        "full_precision_policy": "llama-quantize",
        "seconds": round(time.perf_counter() - started, 3),
    }
