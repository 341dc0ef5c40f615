"""Model preflight: everything about a model directory that can be refused before its weights are read.

A model upload is user input. transformers trusts ``config.json`` when it builds a model, so a lying config
costs real resources before anything fails: ``vocab_size: 1e9`` allocates a terabyte, ``num_hidden_layers:
1e6`` builds layers for minutes, and a truncated file or a shape mismatch ends in an error that names
neither the file nor the tensor. :func:`preflight_model` reads only ``config.json`` (parsed as JSON) and
the safetensors headers (the 8-byte length and the JSON after it; no tensor data) and, in milliseconds:

- refuses a file whose header or tensor data would run past its end, naming the file;
- requires a causal language model transformers knows (``architectures`` holds the causal-LM class of
  ``model_type``: a ``BertModel`` has no LM head and is refused);
- compares the shapes the headers declare with what the config implies (embedding and LM head
  ``vocab_size x hidden_size``, the number of decoder layers, and for the Llama family every projection
  and norm of every layer), naming the tensor and both shapes;
- counts the parameters, so that the caller can hold them against its memory budget
  (:meth:`ModelPreflight.check_memory`).

Every refusal is an :class:`~workers.compression.base.EngineError`: the user's to fix.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.compression.base import EngineError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors' own limit on a header (its loaders refuse larger ones): a bound on what preflight reads."""

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
"""Bytes per element of each safetensors dtype (sub-byte types are not accepted as model inputs)."""

FLOAT32_BYTES = 4  # every engine holds weights in float32 (export.load_model)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header declares it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelPreflight:
    """What preflight learnt about a model directory without reading its weights."""

    config: dict[str, Any]
    tensors: dict[str, TensorHeader]

    @property
    def elements(self) -> int:
        """Scalars in the checkpoint (a quantized checkpoint counts its packed storage)."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def float32_bytes(self) -> int:
        """The model's size once loaded: every engine holds weights in float32."""
        return FLOAT32_BYTES * self.elements

    def check_memory(self, budget_bytes: int, factor: float) -> None:
        """Refuse a model whose float32 size times ``factor`` (the pipeline's peak) exceeds ``budget_bytes``."""
        needed = int(self.float32_bytes * factor)
        if needed > budget_bytes:
            raise EngineError(
                f"the model has {self.elements:,} parameters: {self.float32_bytes / 1e9:.2f} GB in float32, about "
                f"{needed / 1e9:.2f} GB at the pipeline's peak, over this worker's memory budget of "
                f"{budget_bytes / 1e9:.2f} GB; a recipe of one quantize step can stream it (low_memory: true)"
            )


# ---------------------------------------------------------------- safetensors headers


def read_safetensors_header(path: Path) -> dict[str, TensorHeader]:
    """The tensors ``path`` declares, after checking that the header and every tensor's bytes lie inside the
    file and that each tensor's byte count matches its dtype and shape. Reads the header only."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise EngineError(f"{path.name} is not a safetensors file: {size} bytes, shorter than its header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise EngineError(f"{path.name}: header of {length} bytes, over safetensors' limit of {MAX_HEADER_BYTES}")
        if 8 + length > size:
            raise EngineError(f"{path.name} is truncated: its header ends at byte {8 + length}, the file at {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path.name}: the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise EngineError(f"{path.name}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    return {
        name: _tensor_header(path.name, name, entry, data_bytes)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _tensor_header(file: str, name: str, entry: Any, data_bytes: int) -> TensorHeader:
    if not isinstance(entry, dict):
        raise EngineError(f"{file}: tensor {name!r} has no header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise EngineError(f"{file}: tensor {name!r} has dtype {dtype!r}, not one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise EngineError(f"{file}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        raise EngineError(f"{file}: tensor {name!r} has invalid data offsets {offsets!r}")
    begin, end = offsets
    if end > data_bytes:
        raise EngineError(
            f"{file} is truncated or corrupt: tensor {name!r} ends at data byte {end}, the file holds {data_bytes}"
        )
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise EngineError(
            f"{file}: tensor {name!r} ({dtype} {shape}) should take {expected} bytes, its offsets span {end - begin}"
        )
    return TensorHeader(name=name, dtype=dtype, shape=tuple(shape), file=file)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_checkpoint_headers(model_dir: Path) -> dict[str, TensorHeader]:
    """Every tensor of the directory's ``*.safetensors`` files (one file or shards), by name. A name found in
    two files is refused: which one transformers would load depends on the index, not on what the user meant."""
    tensors: dict[str, TensorHeader] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, tensor in read_safetensors_header(path).items():
            if name in tensors:
                raise EngineError(f"tensor {name!r} is in both {tensors[name].file} and {path.name}")
            tensors[name] = tensor
    if not tensors:
        raise EngineError("the model's *.safetensors files hold no tensors")
    _check_index(Path(model_dir), tensors)
    return tensors


def _check_index(model_dir: Path, tensors: Mapping[str, TensorHeader]) -> None:
    """A shard index must name only tensors that are where it says (transformers reads shards through it)."""
    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise EngineError(f"{index_path.name} is not a valid shard index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise EngineError(f"{index_path.name} has no 'weight_map' object")
    for name, file in weight_map.items():
        found = tensors.get(name)
        if found is None or found.file != file:
            where = f"it is in {found.file}" if found is not None else "no shard holds it"
            raise EngineError(f"{index_path.name} puts tensor {name!r} in {file!r}, but {where}")


# ---------------------------------------------------------------- the config


def check_causal_lm(config: Mapping[str, Any]) -> str:
    """The model's causal-LM class name; refuses a config whose ``architectures`` does not name the one
    transformers knows for its ``model_type`` (transformers picks the class from ``model_type`` and would add
    a random head to, say, a ``BertModel``). A config without ``architectures`` names no other class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise EngineError(f"config.json model_type {model_type!r} is not a causal language model transformers knows")
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    architectures = config.get("architectures")
    if architectures is None:  # a bare config: transformers builds `expected`, whose head weights load checks
        return str(expected)
    if not isinstance(architectures, list) or expected not in architectures:
        raise EngineError(
            f"config.json architectures {architectures!r} is not a causal language model with an LM head "
            f"(for model_type {model_type!r} that is {expected})"
        )
    return str(expected)


SIZE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim",
)  # fmt: skip
"""config.json sizes that must be positive integers wherever they appear (``1e9`` is a float in JSON)."""


def _positive_int(config: Any, key: str) -> int:
    """``config[key]`` (a parsed config.json) or ``config.key`` (a transformers config), a positive integer."""
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EngineError(f"config.json {key} must be a positive integer, got {value!r}")
    return value


def _llama_layer_shapes(config: Any, hidden: int) -> dict[str, tuple[int, ...]]:
    """Per-layer weight shapes of the Llama family (Llama, Mistral, Qwen2/3, Gemma: one naming scheme),
    relative to ``model.layers.N.``."""
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = (
        heads if getattr(config, "num_key_value_heads", None) is None else _positive_int(config, "num_key_value_heads")
    )
    head_dim = _positive_int(config, "head_dim") if getattr(config, "head_dim", None) is not None else hidden // heads
    inter = _positive_int(config, "intermediate_size")
    return {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})
"""``model_type``s whose per-layer shapes :func:`check_declared_shapes` knows."""


def check_declared_shapes(config: Any, tensors: Mapping[str, TensorHeader]) -> None:
    """Refuse a checkpoint whose declared shapes disagree with its config (a transformers config object, so
    that each family's defaults apply): the embedding and LM head (vocab x hidden), the decoder layer count,
    the least number of parameters the config implies (whatever the tensors are called), and for
    :data:`LLAMA_FAMILY` every projection and norm of every layer. Quantized weights stored packed
    (``weight_packed``) have no ``weight`` entry and are not compared."""
    vocab, hidden = _positive_int(config, "vocab_size"), _positive_int(config, "hidden_size")
    layers = _positive_int(config, "num_hidden_layers")
    _check_outline(vocab, hidden, layers, tensors)  # before anything is computed per layer
    if config.model_type in LLAMA_FAMILY:
        per_layer = _llama_layer_shapes(config, hidden)
        expected: dict[str, tuple[int, ...]] = {"model.norm.weight": (hidden,)}
        for index in range(layers):
            expected.update({f"model.layers.{index}.{key}": shape for key, shape in per_layer.items()})
        _compare_shapes(expected, tensors)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        raise EngineError(
            "the checkpoint has no LM head ('lm_head.weight') and config.json tie_word_embeddings is false: "
            "transformers would add a random one"
        )


def _check_outline(vocab: int, hidden: int, layers: int, tensors: Mapping[str, TensorHeader]) -> None:
    """The checks that need only the three sizes every decoder config names: layer count, embedding and LM head
    shapes, and the least parameter count (:func:`_check_scale`)."""
    _check_layer_count(layers, tensors)
    _compare_shapes({"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}, tensors)
    _check_scale(vocab, hidden, layers, tensors)


def _compare_shapes(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, TensorHeader]) -> None:
    for name, shape in expected.items():
        found = tensors.get(name)
        if found is not None and found.shape != shape:
            raise EngineError(
                f"tensor {name!r} in {found.file} has shape {list(found.shape)}, but config.json implies {list(shape)}"
            )


def _check_scale(vocab: int, hidden: int, layers: int, tensors: Mapping[str, TensorHeader]) -> None:
    """Whatever its tensor names, a decoder of ``layers`` layers of width ``hidden`` over ``vocab`` tokens holds
    at least ``layers x hidden² + vocab x hidden`` parameters (one hidden x hidden projection a layer, one
    embedding). Refuse a config that implies more than twice what the checkpoint holds (twice: packed 4-bit
    weights count one element per eight): transformers would build, and allocate, what the config says."""
    implied = layers * hidden * hidden + vocab * hidden
    held = sum(t.numel for t in tensors.values())
    if implied > 2 * held:
        raise EngineError(
            f"config.json (vocab_size {vocab}, hidden_size {hidden}, num_hidden_layers {layers}) describes at least "
            f"{implied:,} parameters, but the checkpoint holds {held:,}"
        )


def _check_layer_count(layers: int, tensors: Iterable[str]) -> None:
    found = {int(match.group(1)) for name in tensors if (match := _LAYER.match(name))}
    if found and (len(found) != layers or min(found) != 0 or max(found) != layers - 1):  # i.e. not 0..layers-1
        raise EngineError(
            f"config.json num_hidden_layers is {layers}, but the checkpoint has layers {min(found)}..{max(found)} "
            f"({len(found)} of them)"
        )


def _transformers_config(model_dir: Path) -> Any:
    """The config as transformers reads it (each family's defaults filled in); no remote code. Builds no layers."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        raise EngineError(f"cannot read config.json: {exc}") from exc
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def preflight_model(model_dir: Path, config: Mapping[str, Any]) -> ModelPreflight:
    """Check ``model_dir``'s safetensors headers against its ``config.json`` (see the module docstring).
    ``config`` is the parsed file from :func:`workers.compression.export.check_model_dir` (JSON, no remote
    code); it is checked before transformers reads it."""
    check_causal_lm(config)
    for key in SIZE_FIELDS:
        if config.get(key) is not None:
            _positive_int(config, key)
    tensors = read_checkpoint_headers(model_dir)
    if all(config.get(key) is not None for key in ("vocab_size", "hidden_size", "num_hidden_layers")):
        # Before transformers parses the config: some families build a list per layer there.
        vocab, hidden = _positive_int(config, "vocab_size"), _positive_int(config, "hidden_size")
        _check_outline(vocab, hidden, _positive_int(config, "num_hidden_layers"), tensors)
    check_declared_shapes(_transformers_config(model_dir), tensors)
    return ModelPreflight(config=dict(config), tensors=tensors)
