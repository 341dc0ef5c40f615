"""Layer-by-layer calibration: the one loop shared by every calibrated engine (GPTQ, AWQ, SmoothQuant,
static activation scales, Wanda, SparseGPT, structured-pruning importance).

The calibration batches run through the embeddings once; then, for each decoder layer in turn, the
engine's ``process`` callback observes the layer on the current inputs (e.g. by hooks while calling
``replay()``), modifies it, and the *modified* layer's outputs become the next layer's inputs. Memory
stays bounded by one layer plus the activations, as in llm-compressor's sequential pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from workers.compression.base import Callbacks, EngineError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama-style causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EngineError(f"unsupported architecture {type(model).__name__}: no model.layers decoder stack")
    return layers


class _Captured(Exception):  # noqa: N818 - control flow
    pass


@dataclass
class LayerBatch:
    """One calibration batch at the input of a decoder layer: hidden states plus the layer's other kwargs."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[LayerBatch]:
    """Run the model up to its first decoder layer and keep what that layer receives, per batch."""
    first = decoder_layers(model)[0]
    batches: list[LayerBatch] = []

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kept["use_cache"] = False
        batches.append(LayerBatch(hidden=hidden.detach(), kwargs=kept))
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                chunk = input_ids[start : start + batch_size].to(_device_of(model))
                with suppress(_Captured):
                    model(input_ids=chunk, use_cache=False)
    finally:
        handle.remove()
    return batches


class StopLayer(Exception):  # noqa: N818 - control flow
    """Raised by an observing hook that has seen all it needs of this call of the layer: the rest of
    the layer's forward is skipped and that batch gives no output."""


def run_layer(layer: nn.Module, batches: list[LayerBatch]) -> list[torch.Tensor]:
    """Forward every batch through one decoder layer and return the output hidden states (of the
    batches whose forward no hook stopped)."""
    outputs = []
    with torch.no_grad():
        for batch in batches:
            try:
                out = layer(batch.hidden, **batch.kwargs)
            except StopLayer:
                continue
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


ProcessFn = Callable[[int, str, nn.Module, Callable[[], list[torch.Tensor]]], None]
"""``process(index, prefix, layer, replay)``: observe and modify one layer. ``prefix`` is the layer's
module name in the model (``model.layers.3``); ``replay()`` runs the layer's current weights over the
calibration inputs and returns its outputs."""


def layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    process: ProcessFn,
    callbacks: Callbacks | None = None,
    batch_size: int = 8,
    propagate: bool = True,
) -> None:
    """Calibrate ``model`` one decoder layer at a time (see module docstring).

    With ``propagate=True`` the next layer sees the outputs of the already-modified layer, so
    errors are corrected downstream (GPTQ/SparseGPT practice); with ``False`` it sees the
    original layer's outputs.
    """
    callbacks = callbacks or Callbacks()
    layers = decoder_layers(model)
    batches = capture_layer_inputs(model, input_ids, batch_size)
    total = len(layers)
    for index, layer in enumerate(layers):
        callbacks.check()
        original_out: list[torch.Tensor] | None = None
        if not propagate:
            original_out = run_layer(layer, batches)
        process(index, f"model.layers.{index}", layer, partial(run_layer, layer, batches))
        outputs = run_layer(layer, batches) if original_out is None else original_out
        for batch, out in zip(batches, outputs, strict=True):
            batch.hidden = out
        callbacks.progress((index + 1) / total, f"layer {index + 1}/{total}")


@contextmanager
def capture_linear_inputs(layer: nn.Module, names: list[str] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, record the 2-D inputs ``[tokens, in_features]`` of the layer's Linear modules.

    Linears fed the very same tensor (q/k/v, gate/up) are recorded under each name but refer to
    one tensor, so an engine can compute one statistic per shared input.
    """
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            seen[name] = []

            def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any, name: str = name) -> None:
                x = args[0].detach()
                seen[name].append(x.reshape(-1, x.shape[-1]))

            handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
