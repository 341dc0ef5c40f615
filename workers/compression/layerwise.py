"""Layer-by-layer calibration: the one loop shared by every calibrated engine (GPTQ, AWQ, SmoothQuant,
static activation scales, Wanda, SparseGPT, structured-pruning importance).

The calibration batches run through the embeddings once; then, for each decoder layer in turn, the
engine's ``process`` callback observes the layer on the current inputs (e.g. by hooks while calling
``replay()``), modifies it, and the *modified* layer's outputs become the next layer's inputs. Memory
stays bounded by one layer plus the activations, as in llm-compressor's sequential pipeline.

The loop computes on a ``device`` (where the model lives by default). A model kept in host memory is
*onloaded*: each decoder layer moves to the device for its turn and back after it, so the device
holds one layer, the activations and the statistics (llm-compressor's sequential onloading). When
even the activations do not fit (:func:`workers.compression.device.plan_onload`), they are *spilled*
to (pinned) host memory and visit the device one batch at a time; the results are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from workers.compression import heap
from workers.compression.base import Callbacks, EngineError, device_of
from workers.compression.device import (
    OnloadPlan,
    cuda_peak,
    device_budget,
    host_buffer,
    layer_footprint,
    plan_onload,
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama-style causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EngineError(f"unsupported architecture {type(model).__name__}: no model.layers decoder stack")
    return layers


class _Captured(Exception):  # noqa: N818 - control flow
    pass


class LayerBatch:
    """One calibration batch at the input of a decoder layer: hidden states plus the layer's other kwargs.

    ``layer_kwargs``: what each decoder layer receives besides the hidden states. Masks and rotary
    embeddings can differ from layer to layer (sliding-window layers, local and global RoPE). Empty:
    ``kwargs`` serve every layer.

    A spilled batch (:meth:`to` with ``spill``) keeps its hidden states in host memory: reading :attr:`hidden`
    brings them to the compute device, assigning it puts the new ones back, so the code that reads
    and writes batches is the same either way.
    """

    def __init__(
        self, hidden: torch.Tensor, kwargs: dict[str, Any], layer_kwargs: list[dict[str, Any]] | None = None
    ) -> None:
        self._hidden = hidden
        self.kwargs = kwargs
        self.layer_kwargs: list[dict[str, Any]] = layer_kwargs if layer_kwargs is not None else []
        self._compute: torch.device | None = None  # set while spilled

    @property
    def hidden(self) -> torch.Tensor:
        if self._compute is None:
            return self._hidden
        # From pinned memory the copy is asynchronous, ordered before the kernels that read it.
        return self._hidden.to(self._compute, non_blocking=True)

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        if self._compute is None:
            self._hidden = value
        else:
            self._hidden = host_buffer(value, self._compute).copy_(value)

    @property
    def spilled(self) -> bool:
        return self._compute is not None

    def at_layer(self, index: int) -> LayerBatch:
        """Point ``kwargs`` at what decoder layer ``index`` receives."""
        if self.layer_kwargs:
            self.kwargs = self.layer_kwargs[index]
        return self

    def to(self, device: torch.device, *, spill: bool = False, moved: dict[int, Any] | None = None) -> None:
        """Put the layer arguments on ``device``, and the hidden states too unless ``spill`` (then they wait
        in host memory). ``moved`` maps tensors already moved (by ``id``) to their copies: the batches of
        one run share their rotary embeddings and masks, and every layer's arguments are the same
        tensors, so each is moved once."""
        moved = {} if moved is None else moved
        self.kwargs = _moved(self.kwargs, device, moved)
        self.layer_kwargs = [_moved(kwargs, device, moved) for kwargs in self.layer_kwargs]
        hidden = self.hidden
        self._compute = None
        self.hidden = hidden.to(device)
        if spill:
            self._compute = device
            self.hidden = self._hidden


def _moved(value: Any, device: torch.device, moved: dict[int, Any]) -> Any:
    """``value`` with its tensors (also inside tuples, lists and dicts) on ``device``, each moved once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = (value, value.to(device))  # the original kept alive: its id stays unique
        return moved[id(value)][1]
    if isinstance(value, tuple | list):
        return type(value)(_moved(v, device, moved) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device, moved) for k, v in value.items()}
    return value


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[LayerBatch]:
    """Run the model's embeddings and keep, per batch, what its first decoder layer receives and the
    other arguments every later layer receives (the layers themselves are not run: each is replaced
    by a pass-through for the call, and the last one ends it)."""
    layers = decoder_layers(model)
    batches: list[LayerBatch] = []

    def pass_through(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
            kept["use_cache"] = False
            if index == 0:
                batches.append(LayerBatch(hidden=hidden.detach(), kwargs=kept))
            batches[-1].layer_kwargs.append(kept)
            if index == len(layers) - 1:
                raise _Captured
            return hidden

        return forward

    own = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = pass_through(index)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                chunk = input_ids[start : start + batch_size].to(device_of(model))
                count = len(batches)
                try:
                    model(input_ids=chunk, use_cache=False)
                except _Captured:
                    continue
                except Exception:
                    # A model whose layers must return more than the hidden states stumbled past the
                    # first one: its first layer's arguments then serve every layer, as they must.
                    if len(batches) == count:
                        raise
                    batches[-1].layer_kwargs = []
    finally:
        for layer, forward in zip(layers, own, strict=True):
            del layer.forward
            if forward is not None:
                layer.forward = forward
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

StageFn = Callable[[int, str, nn.Module, list[str], Iterable[torch.Tensor]], None]
"""``stage(index, prefix, layer, names, inputs)``: observe the input every batch feeds the Linears
``names`` (layer-relative, sharing that input) and modify those Linears, before they are applied
(see :func:`staged_forward`)."""


# The Linears of a Llama-shape decoder layer, grouped by the input they read, in the order they run.
ATTENTION_IN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
ATTENTION_OUT = ["self_attn.o_proj"]
MLP_IN = ["mlp.gate_proj", "mlp.up_proj"]
MLP_OUT = ["mlp.down_proj"]
# In staged_forward, the inputs of o_proj and down_proj (tokens x width) are kept for every batch
# up to this size; beyond it the attention or MLP runs a second time instead (more FLOPs, no more
# memory than observing the whole layer and running it again).
STORE_BYTES = 1 << 30
_LLAMA_MODULES = ["input_layernorm", "post_attention_layernorm", *ATTENTION_IN, *ATTENTION_OUT, *MLP_IN, *MLP_OUT]


@dataclass(frozen=True)
class LayerwiseRun:
    """What :func:`layerwise` did: whether the layers ran group by group (``stage``) rather than observed
    whole (``process``), and where it computed, with the memory it expected and measured."""

    staged: bool
    memory: OnloadPlan


def layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    process: ProcessFn,
    callbacks: Callbacks | None = None,
    batch_size: int = 8,
    propagate: bool = True,
    stage: StageFn | None = None,
    inspect: Callable[[nn.Module, LayerBatch], None] | None = None,
    *,
    device: torch.device | str | None = None,
    budget: int | None = None,
    solves: bool = True,
) -> LayerwiseRun:
    """Calibrate ``model`` one decoder layer at a time (see module docstring).

    With ``propagate=True`` the next layer sees the outputs of the already-modified layer, so
    errors are corrected downstream (GPTQ/SparseGPT practice); with ``False`` it sees the
    original layer's outputs. An engine that can work one group of Linears at a time passes
    ``stage``: layers of the Llama shape then run once, in :func:`staged_forward`, instead of
    being observed by ``process`` and run again. ``inspect(first layer, first batch)`` runs once,
    before any layer is modified.

    ``device`` is where the layers compute (default: where the model is); a model elsewhere is
    onloaded one layer at a time. ``budget`` is the device bytes the loop may use (default:
    :func:`~workers.compression.device.device_budget`, no limit on the CPU); the hidden states are
    spilled to host memory when :func:`~workers.compression.device.peak_bytes` says they would not
    fit. ``solves``: the engine solves per group of Linears (GPTQ, SparseGPT, the AWQ search), whose
    working set is then counted.
    """
    callbacks = callbacks or Callbacks()
    layers = decoder_layers(model)
    home = device_of(model)
    compute = _concrete(torch.device(device) if device is not None else home)
    onload = compute != home
    budget = budget if budget is not None else device_budget(compute)
    staged = False
    with heap.retained_heap(), cuda_peak(compute) as peak:  # retained heap: each layer reuses the last's pages
        batches = capture_layer_inputs(model, input_ids, batch_size)
        group_by_group = stage is not None and propagate and _has_llama_shape(layers[0])
        footprint = layer_footprint(
            layers[0],
            [batch.hidden for batch in batches],
            [(batch.kwargs, batch.layer_kwargs) for batch in batches],
            input_groups=linear_input_groups(layers[0]),
            whole_layer_statistics=not group_by_group,
            solves=solves,
            onload=onload,
        )
        plan = plan_onload(footprint, budget, device=compute, onload=onload)
        moved: dict[int, Any] = {}
        for batch in batches:
            batch.to(compute, spill=plan.spill, moved=moved)
        del moved
        total = len(layers)
        for index, layer in enumerate(layers):
            callbacks.check()
            with _visiting(layer, compute, home, onload):
                if index == 0 and batches:
                    if inspect is not None:
                        inspect(layer, batches[0])
                    staged = stage is not None and propagate and stages_match(layer, batches[0])
                store = 0 if plan.spill else STORE_BYTES  # spilled: nothing kept across batches on the device
                calibrate_layer(index, layer, batches, process, stage if staged else None, propagate, store)
            callbacks.progress((index + 1) / total, f"layer {index + 1}/{total}")
        del batches
    return LayerwiseRun(staged=staged, memory=replace(plan, measured_peak_bytes=peak.added))


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:N`` tensors report (so that a model on it compares equal)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def _visiting(layer: nn.Module, compute: torch.device, home: torch.device, onload: bool) -> Iterator[None]:
    """With ``onload``, ``layer`` on the compute device for the block and back home after (its Parameter
    objects stay: hooks, qparams and the engines' references to modules see the moved tensors)."""
    if not onload:
        yield
        return
    layer.to(compute)
    try:
        yield
    finally:
        layer.to(home)


def linear_input_groups(layer: nn.Module) -> list[tuple[int, int]]:
    """``(width, rows)`` of every distinct tensor a layer's Linears read, ``rows`` the output rows of the
    Linears reading it: the four groups of a Llama-shape layer (q/k/v, o, gate/up, down), otherwise one
    per Linear (an upper bound)."""
    if not _has_llama_shape(layer):
        return [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)]
    groups = []
    for names in (ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT):
        width, rows = 0, 0
        for name in names:
            linear = layer.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            width, rows = linear.in_features, rows + linear.out_features
        groups.append((width, rows))
    return groups


def calibrate_layer(
    index: int,
    layer: nn.Module,
    batches: list[LayerBatch],
    process: ProcessFn,
    stage: StageFn | None = None,
    propagate: bool = True,
    store_bytes: int = STORE_BYTES,
) -> None:
    """One layer of :func:`layerwise`: observe and modify it (by groups when ``stage`` is given and the
    layer has the Llama shape), then move every batch's hidden states past it."""
    prefix = f"model.layers.{index}"
    for batch in batches:
        batch.at_layer(index)
    if stage is not None and _has_llama_shape(layer):
        staged_forward(layer, batches, partial(stage, index, prefix, layer), store_bytes)
        return
    original_out = None if propagate else run_layer(layer, batches)
    process(index, prefix, layer, partial(run_layer, layer, batches))
    outputs = run_layer(layer, batches) if original_out is None else original_out
    for batch, out in zip(batches, outputs, strict=True):
        batch.hidden = out


# ---------------------------------------------------------------- one group of Linears at a time


def _has_llama_shape(layer: nn.Module) -> bool:
    return all(_submodule(layer, name) is not None for name in _LLAMA_MODULES)


def _submodule(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def staged_forward(
    layer: nn.Module,
    batches: list[LayerBatch],
    on_group: Callable[[list[str], Iterable[torch.Tensor]], None],
    store_bytes: int = STORE_BYTES,
) -> None:
    """Run a Llama-shape decoder layer over every batch one group of Linears at a time, so that each
    group is observed on, and modified before, the input that the *modified* groups before it
    produce (the GPTQ paper's "true sequential" order), and each Linear is applied once.

    ``h₁ = h + o(attn(q, k, v of norm₁(h)))``, ``out = h₁ + down(act(gate) · up of norm₂(h₁))``:
    ``on_group(names, inputs)`` sees ``norm₁(h)`` for q/k/v, the attention output for o,
    ``norm₂(h₁)`` for gate/up and ``act(gate) · up`` for down (``inputs`` may be iterated once).
    The attention and the MLP run as the layer's own modules; a hook takes the input of their
    last Linear and stops them there. Those inputs are kept for all batches when they take at most
    ``store_bytes``; otherwise the block runs a second time after its last Linear is modified.
    Every batch's hidden states end as the layer's output. :func:`stages_match` checks that a
    model's layers compute what this assumes.
    """
    attn, mlp = layer.get_submodule("self_attn"), layer.get_submodule("mlp")
    norm_in, norm_post = layer.get_submodule("input_layernorm"), layer.get_submodule("post_attention_layernorm")
    with torch.no_grad():
        on_group(ATTENTION_IN, (norm_in(b.hidden) for b in batches))
        # The norm runs again in the block: the group's callback may have rescaled it (SmoothQuant).
        _block_then_residual(batches, attn, norm_in, ATTENTION_OUT, on_group, store_bytes, with_kwargs=True)
        on_group(MLP_IN, (norm_post(b.hidden) for b in batches))
        _block_then_residual(batches, mlp, norm_post, MLP_OUT, on_group, store_bytes, with_kwargs=False)


def _block_then_residual(
    batches: list[LayerBatch],
    block: nn.Module,
    norm: nn.Module,
    last_names: list[str],
    on_group: Callable[[list[str], Iterable[torch.Tensor]], None],
    store_bytes: int,
    *,
    with_kwargs: bool,
) -> None:
    """``h += block(norm(h))`` for every batch, with ``on_group`` shown the input of the block's last
    Linear (named ``last_names[0]`` in the layer, relative to the block's parent) before it runs."""
    last = block.get_submodule(last_names[0].split(".", 1)[1])
    assert isinstance(last, nn.Linear)

    def up_to_last(batch: LayerBatch) -> torch.Tensor:
        return _input_of(last, block, norm(batch.hidden), batch.kwargs if with_kwargs else {})

    tokens = sum(b.hidden.numel() // b.hidden.shape[-1] for b in batches)
    if tokens * last.in_features * last.weight.element_size() <= store_bytes:
        seen = [up_to_last(b) for b in batches]
        on_group(last_names, seen)
        for batch, x in zip(batches, seen, strict=True):
            batch.hidden = batch.hidden + last(x)
        return
    on_group(last_names, (up_to_last(b) for b in batches))
    for batch in batches:
        out = block(norm(batch.hidden), **(batch.kwargs if with_kwargs else {}))
        batch.hidden = batch.hidden + (out[0] if isinstance(out, tuple) else out)


def _input_of(last: nn.Module, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run ``block`` on ``hidden`` until ``last`` is called; return what ``last`` would have read."""
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])
        raise StopLayer

    handle = last.register_forward_pre_hook(grab)
    try:
        block(hidden, **kwargs)
    except StopLayer:
        pass
    finally:
        handle.remove()
    if not seen:
        raise EngineError(f"{type(block).__name__} never called its {type(last).__name__}")
    return seen[0]


def stages_match(layer: nn.Module, batch: LayerBatch) -> bool:
    """Whether :func:`staged_forward` computes what ``layer`` does on ``batch`` (to float rounding):
    a model whose layers merely carry the Llama names but wire them otherwise (extra norms, a
    parallel attention/MLP block) is calibrated by the generic observe-then-run path instead."""
    if not _has_llama_shape(layer):
        return False
    with torch.no_grad():
        expected = run_layer(layer, [batch])[0]
        probe = [LayerBatch(hidden=batch.hidden, kwargs=batch.kwargs)]
        try:
            staged_forward(layer, probe, lambda _names, _inputs: None)
        except (EngineError, TypeError, ValueError, RuntimeError):
            return False
    actual = probe[0].hidden
    return actual.shape == expected.shape and bool(torch.allclose(actual, expected, rtol=1e-4, atol=1e-5))
