"""Low-memory quantization: a model that never sits whole in memory.

``quantize_streaming(model_dir, step, out_dir, calibration=ids)`` builds the model's skeleton on the
``meta`` device (shapes, no storage), then walks the decoder stack once. For each layer it reads
that layer's tensors from the safetensors shards, calibrates and quantizes it with the very code
the in-memory engine uses (:class:`workers.compression.quantize._Run`), pushes the calibration
activations through the quantized layer, writes the layer's compressed tensors to the output
shards and frees it. Peak memory is one float32 layer, its Hessians and the activations:
independent of depth, so a model larger than RAM still completes.

Perplexity before and after comes out of the same walk: the evaluation windows travel beside the
calibration batches, once through each original layer and once through each quantized one, and
the final norm + ``lm_head`` score both streams (the same per-window NLL as
:func:`workers.compression.evaluate.perplexity`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from workers.compression import heap
from workers.compression.base import Callbacks, EngineError, StepOutcome
from workers.compression.evaluate import perplexity_from, token_nll
from workers.compression.export import check_model_dir, checkpoint_compressor, compressed_tensors_of
from workers.compression.layerwise import (
    LayerBatch,
    calibrate_layer,
    capture_layer_inputs,
    decoder_layers,
    run_layer,
    stages_match,
)
from workers.compression.quantize import CALIBRATION_BATCH, prepare_quantization
from workers.compression.recipe import QuantizeStep
from workers.compression.weight_quant import without_compiled_kernels

# Output shards are closed when their data pass this size (their bytes go to disk as they come).
DEFAULT_SHARD_BYTES = 256 * 2**20
# Side files copied from the input directory as they are (the tokenizer is copied, not re-saved).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read on demand.

    Every :meth:`read` opens the shards it needs and closes them before returning, so no file stays
    memory-mapped between layers and the process's resident set holds only what was asked for.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.location: dict[str, Path] = {}
        self.elements = 0  # float32 bytes = 4 * elements: how the engines hold weights
        for path in sorted(self.model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self.location[key] = path
                    self.elements += math.prod(handle.get_slice(key).get_shape())
        if not self.location:
            raise EngineError("no tensors in the model's *.safetensors files")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors in float32 (missing names raise :class:`EngineError`)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            path = self.location.get(name)
            if path is None:
                raise EngineError(
                    f"tensor {name!r} is not in the checkpoint; low-memory mode needs tensor names that match "
                    "the model's modules (a standard transformers checkpoint)"
                )
            by_file.setdefault(path, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key).to(torch.float32)
        return out


def meta_model(model_dir: Path) -> Any:
    """The model's skeleton on the meta device (no weights read), in float32; no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise EngineError(f"cannot read the model config: {exc}") from exc
    if getattr(config, "quantization_config", None) is not None:
        raise EngineError("model is already quantized; quantize a full-precision model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    # Non-persistent buffers (rotary inverse frequencies) are computed at init, not read from files:
    # rebuild those modules on the CPU.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=model.config))
    model.eval()
    return model


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, *, source_prefix: str | None = None) -> None:
    """Give ``module``'s meta tensors real CPU storage and fill those the checkpoint holds.

    ``prefix`` is the module's name in the model (``model.layers.3.``); ``source_prefix`` reads the
    tensors under another name (a tied ``lm_head`` reads ``model.embed_tokens.``). Quantization
    parameters the checkpoint does not have (``weight_scale``…) stay uninitialised for the engine.
    """
    module.to_empty(device="cpu")
    local = [key for key, _ in module.named_parameters()] + [key for key, _ in module.named_buffers()]
    wanted = {key: (source_prefix or prefix) + key for key in local}
    present = {key: name for key, name in wanted.items() if name in reader.location}
    missing = [name for key, name in wanted.items() if key not in present and not _is_qparam(key)]
    if missing:
        reader.read(missing[:1])  # raises the readable error
    tensors = reader.read(present.values())
    with torch.no_grad():
        for key, name in present.items():
            target = module.get_parameter(key) if _is_param(module, key) else module.get_buffer(key)
            if tuple(target.shape) != tuple(tensors[name].shape):
                raise EngineError(
                    f"{name}: shape {list(tensors[name].shape)} in the checkpoint, model expects {list(target.shape)}"
                )
            target.copy_(tensors[name])


def release(module: nn.Module) -> None:
    """Drop ``module``'s storage (back to meta) and hand freed heap pages back to the OS."""
    module.to("meta")
    heap.trim()


def _is_param(module: nn.Module, key: str) -> bool:
    return any(key == name for name, _ in module.named_parameters())


def _is_qparam(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf.startswith(
        (
            "weight_scale",
            "weight_zero_point",
            "weight_g_idx",
            "input_scale",
            "input_zero_point",
            "output_scale",
            "output_zero_point",
        )
    )


# safetensors' names of the dtypes a compressed checkpoint holds.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` shards as they come, plus the index.

    A tensor's bytes go straight to the open shard's data file, so memory never holds more than the
    tensor being written. safetensors puts a header with every tensor's offsets in front of the
    data, so a shard's file is assembled when it is complete: header, then its data file copied
    behind it (one sequential disk copy per shard).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.entries: dict[str, dict[str, Any]] = {}
        self.written = 0
        self.data: Any = None  # the open shard's data file
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            value = tensor.detach().to("cpu").contiguous()
            dtype = _SAFETENSORS_DTYPES.get(value.dtype)
            if dtype is None:
                raise EngineError(f"cannot write {key}: dtype {value.dtype} has no safetensors name here")
            if self.data is None:
                self.data = open(self.out_dir / f".shard-{len(self.shards):05d}.data", "w+b")  # noqa: SIM115
            size = value.numel() * value.element_size()
            self.entries[key] = {
                "dtype": dtype,
                "shape": list(value.shape),
                "data_offsets": [self.written, self.written + size],
            }
            self.data.write(value.reshape(-1).view(torch.uint8).numpy().data)
            self.written += size
        if self.written >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.data is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data start 8-byte aligned
        path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors"
        with path.open("wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            self.data.seek(0)
            shutil.copyfileobj(self.data, out, 16 * 2**20)
        self.data.close()
        Path(self.data.name).unlink()
        self.shards.append((path, list(self.entries)))
        self.total += self.written
        self.entries, self.written, self.data = {}, 0, None

    def finish(self) -> None:
        """Name the shards the transformers way; an index when there are several."""
        self.flush()
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for index, (path, keys) in enumerate(self.shards):
            name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index_doc = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")


@dataclass
class StreamResult:
    """What a streaming run measured beside the step's facts."""

    perplexity_before: float | None
    perplexity_after: float | None
    peak_rss_bytes: int
    model: nn.Module  # the meta skeleton with its quantization schemes (shapes for counting, no storage)


def _peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM``, the high-water mark of its own address space.
    ``ru_maxrss`` is not that: Linux carries it across fork + exec, so a worker or CLI started by a
    large parent would report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the best there is

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _WindowNLL:
    """Per-window NLL sums of one evaluation stream (float64, window order): a perplexity at the end."""

    # Positions scored per lm_head call: a whole window's logits over a large vocabulary would be the
    # biggest tensor of the run (512 x 49152 float32 = 100 MB, twice with the log-softmax).
    CHUNK = 128

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def add(self, norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """Score one window (batch 1) from its last hidden states, as ``evaluate.perplexity`` does."""
        pieces = []
        targets = ids[0, 1:]
        positions = hidden.shape[1] - 1  # the last position predicts nothing inside the window
        for start in range(0, positions, self.CHUNK):
            stop = min(start + self.CHUNK, positions)
            pieces.append(token_nll(lm_head(norm(hidden[:, start:stop]))[0], targets[start:stop]))
        nll = torch.cat(pieces)
        self.nll += float(nll.double().sum().item())
        self.tokens += int(nll.numel())

    def perplexity(self) -> float | None:
        return perplexity_from(self.nll, self.tokens) if self.tokens else None


def quantize_streaming(
    model_dir: Path,
    config: QuantizeStep,
    out_dir: Path,
    *,
    calibration: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    callbacks: Callbacks | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> tuple[StepOutcome, StreamResult]:
    """Quantize the checkpoint in ``model_dir`` into ``out_dir`` one decoder layer at a time.

    Same algorithms, options and output format as :func:`workers.compression.quantize.quantize` +
    :func:`workers.compression.export.save_model`; the tokenizer and generation config are copied.
    ``eval_ids`` (``[n, seq_len]``) are scored before and after in the same walk. The torch loops
    serve GPTQ here, not the compiled ones: loading LLVM would cost more memory than this mode saves.
    """
    with without_compiled_kernels(), heap.mapped_large_blocks():
        return _quantize_streaming(
            model_dir, config, out_dir, calibration, eval_ids, callbacks or Callbacks(), max_shard_bytes
        )


def _quantize_streaming(
    model_dir: Path,
    config: QuantizeStep,
    out_dir: Path,
    calibration: torch.Tensor | None,
    eval_ids: torch.Tensor | None,
    callbacks: Callbacks,
    max_shard_bytes: int,
) -> tuple[StepOutcome, StreamResult]:
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    model = meta_model(model_dir)
    run = prepare_quantization(model, config, calibration)
    layers = decoder_layers(model)
    inner: Any = model.model
    outside_layers = [n for n, _ in inner.named_children() if n not in ("layers", "embed_tokens", "norm", "rotary_emb")]
    if outside_layers:
        raise EngineError(f"low-memory mode supports Llama-style models; unexpected modules: {outside_layers}")

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    compressor = checkpoint_compressor(model)

    # Embeddings: capture what the first layer receives, for calibration (batches of 8) and for
    # evaluation (one window per batch, exactly as `perplexity` scores them).
    callbacks.progress(0.0, "embedding calibration and evaluation text")
    materialize(inner.embed_tokens, "model.embed_tokens.", reader)
    calib = capture_layer_inputs(model, calibration, CALIBRATION_BATCH) if calibration is not None else []
    eval_before = capture_layer_inputs(model, eval_ids, 1) if eval_ids is not None else []
    eval_after = [LayerBatch(b.hidden.clone(), b.kwargs, b.layer_kwargs) for b in eval_before]
    writer.add({"model.embed_tokens." + k: v for k, v in inner.embed_tokens.state_dict().items()})
    release(inner.embed_tokens)

    total = len(layers)
    staged: bool | None = None
    for index, layer in enumerate(layers):
        callbacks.check()
        prefix = f"model.layers.{index}"
        materialize(layer, prefix + ".", reader)
        _advance(index, layer, eval_before)
        if config.calibration_reason is not None:
            if staged is None:  # decided on the first layer, as the in-memory engine does
                run.check_scaling(layer, calib[0])
                staged = run.stages and stages_match(layer, calib[0])
            # Nothing kept across batches (store_bytes=0): the blocks run twice rather than hold more.
            stage = run.process_stage if staged else None
            calibrate_layer(index, layer, calib, run.process_layer, stage, store_bytes=0)
        else:
            run.quantize_uncalibrated(prefix + ".")
        _advance(index, layer, eval_after)
        writer.add(compressed_tensors_of(layer, prefix + "."))
        release(layer)
        callbacks.progress(0.02 + 0.95 * (index + 1) / total, f"layer {index + 1}/{total}")

    callbacks.check()
    before, after = _head(model, run, reader, writer, calib, (eval_before, eval_after), eval_ids, callbacks)
    writer.finish()

    model.config.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    callbacks.progress(1.0, "quantized")

    run.true_sequential = bool(staged)
    facts = run.facts(model, seconds=time.perf_counter() - started)
    peak = _peak_rss_bytes()
    facts.update({"mode": "layer_streaming", "peak_rss_bytes": peak, "checkpoint_float32_bytes": 4 * reader.elements})
    callbacks.metrics({"quantize_seconds": facts["seconds"], "mean_output_error": facts["mean_output_error"]})
    return StepOutcome(model=model, facts=facts), StreamResult(before, after, peak, model)


def _head(
    model: Any,
    run: Any,
    reader: CheckpointReader,
    writer: ShardWriter,
    calib: list[LayerBatch],
    evals: tuple[list[LayerBatch], list[LayerBatch]],
    eval_ids: torch.Tensor | None,
    callbacks: Callbacks,
) -> tuple[float | None, float | None]:
    """Final norm and lm_head: score both evaluation streams (before, after), quantize lm_head if it is a
    target, write both, free them."""
    inner, lm_head = model.model, model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    materialize(inner.norm, "model.norm.", reader)
    materialize(lm_head, "lm_head.", reader, source_prefix="model.embed_tokens." if tied else None)
    with torch.no_grad():
        before = _score(inner.norm, lm_head, evals[0], eval_ids, callbacks)
        if "lm_head" in run.targets:
            absmax = None
            if run.config.static_activations:
                absmax = torch.stack(
                    [inner.norm(b.hidden).reshape(-1, b.hidden.shape[-1]).abs().amax(0) for b in calib]
                ).amax(0)
            run.quantize_outside("lm_head", absmax)
        after = _score(inner.norm, lm_head, evals[1], eval_ids, callbacks)
    run.enable_all()
    writer.add({"model.norm." + k: v for k, v in inner.norm.state_dict().items()})
    if not tied:
        writer.add(compressed_tensors_of(lm_head, "lm_head."))
    release(inner.norm)
    release(lm_head)
    return before, after


def _advance(index: int, layer: nn.Module, batches: list[LayerBatch]) -> None:
    """Replace every batch's hidden states by decoder layer ``index``'s output on them."""
    for batch, out in zip(batches, run_layer(layer, [b.at_layer(index) for b in batches]), strict=True):
        batch.hidden = out


def _score(
    norm: nn.Module,
    lm_head: nn.Module,
    batches: list[LayerBatch],
    eval_ids: torch.Tensor | None,
    callbacks: Callbacks,
) -> float | None:
    """Perplexity of one evaluation stream from its last hidden states (one window per batch); a cancel stops
    it between windows (a large vocabulary makes each lm_head pass the costliest of the walk)."""
    if eval_ids is None:
        return None
    nll = _WindowNLL()
    for batch, window in zip(batches, eval_ids, strict=True):
        callbacks.check()
        nll.add(norm, lm_head, batch.hidden, window.unsqueeze(0))
    return nll.perplexity()
