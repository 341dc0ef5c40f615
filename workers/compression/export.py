"""Reading and writing Hugging Face model directories, safely.

``save_model`` is the one writer the service uses for every final model: safetensors weights,
config and tokenizer files; a quantized model (compressed-tensors schemes attached by
:func:`workers.compression.quantize.quantize`) is written as a compressed-tensors checkpoint
(``quantization_config`` in config.json, packed/int/fp8 weights) that transformers and vLLM load.

``load_model`` is the one reader: safetensors only (no pickle, so no code runs on load), no remote
code, an optional size cap, and the preflight of :mod:`workers.compression.preflight` (config and
safetensors headers checked against each other) before anything is read; missing or non-finite weights
refused after.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.utils import get_direct_state_dict
from torch import nn
from torch.overrides import TorchFunctionMode

from workers.compression.base import EngineError, StepCancelled, StopFn
from workers.compression.preflight import ModelPreflight, preflight_model

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_quantized(model: nn.Module) -> bool:
    """Whether any module carries a compressed-tensors quantization scheme."""
    return any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())


def compressed_tensors_of(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``root``'s state dict (keys prefixed with ``prefix``) with every quantized module replaced by its
    compressed tensors (packed int4, int8, fp8 + scales), ready to write.

    Compresses module by module from a copy-free view of the module's own tensors, so the in-memory
    model is left untouched (still fake-quantized and usable) and the extra memory is only the
    compressed weights (int4 packs to 1/8 of float32).
    """
    state: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, module in root.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        module_prefix = f"{prefix}{name}." if name else prefix
        local = get_direct_state_dict(module)
        handled.update(module_prefix + key for key in local)
        if getattr(module, "quantization_status", None) != QuantizationStatus.COMPRESSED:
            local = BaseCompressor.get_value_from_registry(scheme.format.value).compress(local, scheme)
        for key, tensor in local.items():
            if tensor is not None:  # e.g. a Linear without bias
                state[module_prefix + key] = tensor
    for key, tensor in root.state_dict().items():
        if prefix + key not in handled:
            state[prefix + key] = tensor
    return state


def checkpoint_compressor(model: nn.Module) -> ModelCompressor:
    """The compressed-tensors compressor of a quantized model, its config marked as compressed.

    Call before compressing (it also fixes each scheme's storage format); ``update_config(dir)``
    then writes ``quantization_config`` into the saved ``config.json``.
    """
    compressor = ModelCompressor.from_pretrained_model(model)
    assert compressor.quantization_config is not None
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    return compressor


def compressed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], ModelCompressor]:
    """The whole model's compressed state dict and its compressor (see :func:`compressed_tensors_of`)."""
    compressor = checkpoint_compressor(model)
    return compressed_tensors_of(model), compressor


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Write ``model`` (+ ``tokenizer`` when given) to ``out_dir`` as a Hugging Face directory.

    Safetensors only. A quantized model becomes a compressed-tensors checkpoint; a pruned model
    is written dense with its zeros (compressed-tensors 0.20 dropped sparse formats), and a
    structurally pruned one with its already-updated config. A model with a non-finite weight is refused
    before anything is written (:func:`require_finite`).
    """
    out_dir = Path(out_dir)
    if not hasattr(model, "save_pretrained"):
        raise EngineError(f"cannot save {type(model).__name__}: not a transformers model")
    require_finite(model.named_parameters(), "the compressed model")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model: Any = model
    if is_quantized(model):
        state, compressor = compressed_state_dict(model)
        hf_model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        compressor.update_config(str(out_dir))
    else:
        hf_model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


REMOTE_CODE_KEY = "auto_map"


def _read_json_config(path: Path) -> Any:
    """Parse a JSON config and refuse it if any object in it, at any depth, has an ``auto_map`` key.

    Keys are checked after parsing, not searched for in the text: JSON escapes (``"\\u0061uto_map"``),
    nesting and duplicate keys all name the same key to transformers' parser, so they must to ours.
    """
    found: list[bool] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called for every object, innermost first, with every pair (duplicates included).
        if any(key == REMOTE_CODE_KEY for key, _ in items):
            found.append(True)
        return dict(items)

    try:
        value = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise EngineError(f"{path.name} is not valid JSON: {exc}") from exc
    if found:
        raise EngineError(f"{path.name} uses custom code ('{REMOTE_CODE_KEY}'); remote code is not allowed")
    return value


def check_model_dir(model_dir: Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Refuse unsafe or oversized model directories before loading; returns the parsed config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EngineError(f"model directory {model_dir.name!r} not found")
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    pickled = sorted(p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise EngineError(f"pickle weights are not accepted; convert to safetensors (found {', '.join(pickled[:5])})")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EngineError("config.json is missing from the model directory")
    config = _read_json_config(config_path)
    if not isinstance(config, dict):
        raise EngineError("config.json must hold a JSON object")
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        _read_json_config(tokenizer_config)
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        raise EngineError("no *.safetensors weights in the model directory")
    total = sum(p.stat().st_size for p in weights)
    if max_bytes is not None and total > max_bytes:
        raise EngineError(f"model weights are {total} bytes, over the limit of {max_bytes}")
    return config


def _has_packed_zero_points(config: dict[str, Any]) -> bool:
    """Whether a compressed-tensors config stores packed weight zero-points (asymmetric pack-quantized)."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        return False
    for group in (qconfig.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        fmt = group.get("format") or qconfig.get("format")
        if isinstance(weights, dict) and weights.get("symmetric") is False and fmt == "pack-quantized":
            return True
    return False


def inspect_model_dir(model_dir: Path, *, max_bytes: int | None = None) -> ModelPreflight:
    """Everything that can be refused before a model's weights are read: unsafe files, ``auto_map``, weights
    over ``max_bytes`` (:func:`check_model_dir`), then the config and safetensors headers
    (:func:`workers.compression.preflight.preflight_model`). Milliseconds; reads no tensor data."""
    return preflight_model(Path(model_dir), check_model_dir(model_dir, max_bytes=max_bytes))


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse ``what`` ("the input model", "the compressed model") if a floating tensor holds NaN or inf,
    naming the first one: a model whose weights are not finite has broken outputs, never a result."""
    with torch.no_grad():
        for name, tensor in tensors:
            if not tensor.is_floating_point() or tensor.device.type == "meta":
                continue
            if tensor.element_size() == 1:  # float8 has no isfinite kernel; float16 holds every float8 value
                tensor = tensor.to(torch.float16)
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                raise EngineError(f"{what} has non-finite weights: {int((~finite).sum())} NaN/inf values in {name!r}")


STOP_CHECK_INTERVAL_S = 0.1
"""How often :func:`stop_checks` asks ``should_stop`` while transformers builds and loads a model."""


class _StopChecks(TorchFunctionMode):
    """Asks ``should_stop`` from inside transformers' model construction and weight loading, which run no
    code of ours for as long as the model is large (every parameter is created, initialised and filled by
    torch calls): at most every :data:`STOP_CHECK_INTERVAL_S` seconds of those calls, raising
    :class:`StepCancelled` out of ``from_pretrained`` when the job was asked to stop."""

    def __init__(self, should_stop: StopFn) -> None:
        super().__init__()
        self.should_stop = should_stop
        self.next_check = 0.0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + STOP_CHECK_INTERVAL_S
            if self.should_stop():
                raise StepCancelled("cancelled while loading the model")
        return func(*args, **(kwargs or {}))


def stop_checks(should_stop: StopFn | None) -> AbstractContextManager[Any]:
    """Within the block, ``should_stop`` is asked from every torch call (at most every
    :data:`STOP_CHECK_INTERVAL_S`): for code of others that builds or loads a model. Nothing without one."""
    return _StopChecks(should_stop) if should_stop is not None else nullcontext()


def load_model(
    model_dir: Path,
    *,
    max_bytes: int | None = None,
    should_stop: StopFn | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer (``None`` if the directory has none) on the CPU, in float32 unless
    ``dtype`` says otherwise (``"auto"``: the checkpoint's own; see :mod:`workers.compression.device`).

    Safetensors only, ``trust_remote_code=False``, configs with ``auto_map`` refused, weights over
    ``max_bytes`` refused, and everything :func:`inspect_model_dir` checks before a byte of weights is read.
    After loading, a weight the checkpoint lacks (transformers would initialise it at random: a missing LM
    head) or a non-finite weight is refused. Compressed-tensors checkpoints load too (decompressed on first
    forward). ``should_stop`` is asked while the model is built and loaded (:func:`stop_checks`).
    """
    from transformers import AutoModelForCausalLM

    config = inspect_model_dir(model_dir, max_bytes=max_bytes).config
    extra: dict[str, Any] = {}
    if _has_packed_zero_points(config):
        # transformers 5.24 + compressed-tensors 0.20 build asymmetric pack-quantized modules with
        # unpacked zero-point shapes and refuse the (vLLM-format) packed ones; the dequantize
        # route reads them correctly and gives the same dense weights.
        from transformers import CompressedTensorsConfig

        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    loaded: Any
    try:
        with stop_checks(should_stop):
            loaded = AutoModelForCausalLM.from_pretrained(
                model_dir,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=dtype,
                output_loading_info=True,
                **extra,
            )
    except (ValueError, OSError, KeyError) as exc:
        raise EngineError(f"cannot load the model: {exc}") from exc
    model, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise EngineError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {', '.join(missing[:3])}: "
            "transformers would initialise them at random"
        )
    require_finite(model.named_parameters(), "the input model")
    model.eval()
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer (``None`` if it has none); no remote code."""
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, OSError) as exc:
        raise EngineError(f"cannot load the tokenizer: {exc}") from exc
