"""The ``prune`` engine: unstructured (magnitude, Wanda, SparseGPT; a ratio or N:M) or structured.

Unstructured pruning zeroes weights inside the decoder layers' Linear modules and keeps them dense.
Wanda and SparseGPT are calibrated layer by layer through :func:`layerwise` (pruned outputs feed the
next layer) and, within a layer, *sequentially*: Linears sharing an input (q/k/v, then o, then
gate/up, then down) are pruned as a group, and the next group's statistics are gathered after the
previous group was pruned, so e.g. ``down_proj`` compensates for the already-pruned ``up_proj``.

Structured pruning is delegated to :func:`workers.compression.structured.shrink`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from workers.compression.base import Callbacks, EngineError, StepOutcome, set_weight
from workers.compression.hessian import InputStats, collect_input_stats
from workers.compression.layerwise import decoder_layers, layerwise
from workers.compression.matching import ModuleMatcher
from workers.compression.recipe import PruneStep
from workers.compression.sparsegpt import matrix_prune_mask, nm_prune_mask, row_prune_mask, sparsegpt_prune

STORAGE_NOTE = (
    "Unstructured and N:M sparsity is stored as dense weights with zeros: the files are not smaller and "
    "inference in transformers or vLLM is not faster. It pays off only with sparse kernels or sparse-aware "
    "compression formats, or when combined with quantization."
)


def prune(
    model: nn.Module,
    config: PruneStep,
    *,
    calibration: torch.Tensor | None = None,
    callbacks: Callbacks | None = None,
    device: torch.device | str | None = None,
    budget: int | None = None,
) -> StepOutcome:
    """Prune ``model`` in place as ``config`` says and return it with facts about what was done.

    ``calibration`` is ``[n, seq_len]`` token ids, required by wanda, sparsegpt and structured layer
    dropping. Structured pruning may replace modules; use the returned model. Calibrated algorithms
    compute on ``device`` (default: where the model is), one decoder layer at a time when the model
    is elsewhere, within ``budget`` device bytes (:func:`workers.compression.layerwise.layerwise`).
    """
    callbacks = callbacks or Callbacks()
    if config.algorithm == "structured":
        from workers.compression.structured import shrink

        targets = config.targets
        if targets is None:  # guarded by the spec validator; kept for type narrowing
            raise EngineError("structured pruning needs 'targets'")
        return shrink(
            model,
            drop_layers=targets.layers,
            heads=targets.heads,
            mlp=targets.mlp,
            calibration=calibration,
            callbacks=callbacks,
            device=device,
            budget=budget,
        )
    return _prune_unstructured(model, config, calibration, callbacks, device, budget)


def _prune_unstructured(
    model: nn.Module,
    config: PruneStep,
    calibration: torch.Tensor | None,
    callbacks: Callbacks,
    device: torch.device | str | None,
    budget: int | None,
) -> StepOutcome:
    nm = config.nm
    sparsity = config.sparsity
    ignored = ModuleMatcher(config.ignore)
    layers = decoder_layers(model)
    achieved: dict[str, float] = {}
    obs_loss: dict[str, float] = {}
    sizes: dict[str, int] = {}
    device_memory: dict[str, Any] | None = None

    def selected(prefix: str) -> Callable[[str, nn.Linear], bool]:
        return lambda name, _module: not ignored(f"{prefix}.{name}")

    if config.algorithm == "magnitude":
        _prune_by_magnitude(layers, config, selected, callbacks, achieved, sizes)
    else:
        if calibration is None:
            raise EngineError(f"{config.algorithm} pruning needs calibration data")

        def prune_group(prefix: str, layer: nn.Module, names: list[str], stats: InputStats) -> None:
            for name in names:
                module = layer.get_submodule(name)
                assert isinstance(module, nn.Linear)
                weight = module.weight.detach()
                if config.algorithm == "wanda":
                    norms = stats.channel_norms.to(weight.device)
                    scores = weight.abs().float() * norms.unsqueeze(0)
                    mask = nm_prune_mask(scores, *nm) if nm else row_prune_mask(scores, float(sparsity))  # type: ignore[arg-type]
                    set_weight(module, weight.masked_fill(mask, 0.0))
                else:
                    new, loss = sparsegpt_prune(
                        weight,
                        stats.hessian,
                        sparsity=sparsity if nm is None else None,
                        nm=nm,
                        block_size=config.block_size,
                        dampening_frac=config.dampening_frac,
                        name=f"{prefix}.{name}",
                    )
                    set_weight(module, new)
                    obs_loss[f"{prefix}.{name}"] = loss
                achieved[f"{prefix}.{name}"] = _zero_fraction(module.weight)
                sizes[f"{prefix}.{name}"] = module.weight.numel()

        # Wanda needs only per-channel input norms, not the full Hessian SparseGPT solves with.
        diag_only = config.algorithm == "wanda"

        def process(index: int, prefix: str, layer: nn.Module, replay: Callable[[], Any]) -> None:
            for names, stats in _sequential_groups(layer, replay, selected(prefix), diag_only):
                prune_group(prefix, layer, names, stats)

        def stage(index: int, prefix: str, layer: nn.Module, names: list[str], inputs: Iterable[torch.Tensor]) -> None:
            # The same order as _sequential_groups, in one run of the layer (Llama-shape layers).
            chosen = [n for n in names if not ignored(f"{prefix}.{n}")]
            stats = InputStats.of(inputs, chosen, diag_only) if chosen else None
            if stats is not None:
                prune_group(prefix, layer, chosen, stats)

        run = layerwise(
            model, calibration, process, callbacks, stage=stage, device=device, budget=budget, solves=not diag_only
        )
        device_memory = run.memory.to_dict()

    facts = _facts(config, achieved, sizes, obs_loss, len(layers))
    facts["device_memory"] = device_memory
    return StepOutcome(model=model, facts=facts)


def _prune_by_magnitude(
    layers: nn.ModuleList,
    config: PruneStep,
    selected: Callable[[str], Callable[[str, nn.Linear], bool]],
    callbacks: Callbacks,
    achieved: dict[str, float],
    sizes: dict[str, int],
) -> None:
    """Zero the smallest weights of every selected linear (per matrix, or N:M), layer by layer; no data needed."""
    nm, sparsity, total = config.nm, config.sparsity, len(layers)
    for index, layer in enumerate(layers):
        callbacks.check()
        prefix = f"model.layers.{index}"
        for name, module in _linears(layer, selected(prefix)):
            scores = module.weight.detach().abs().float()
            mask = nm_prune_mask(scores, *nm) if nm else matrix_prune_mask(scores, float(sparsity))  # type: ignore[arg-type]
            set_weight(module, module.weight.detach().masked_fill(mask, 0.0))
            achieved[f"{prefix}.{name}"] = _zero_fraction(module.weight)
            sizes[f"{prefix}.{name}"] = module.weight.numel()
        callbacks.progress((index + 1) / total, f"layer {index + 1}/{total}")


def _sequential_groups(
    layer: nn.Module, replay: Callable[[], Any], select: Callable[[str, nn.Linear], bool], diag_only: bool = False
) -> Any:
    """Yield ``(linear names, stats)`` per shared input in forward order, each group's statistics
    gathered after the groups before it were pruned (the caller prunes between yields)."""
    order: list[str] = []
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and select(name, module):

            def note(_m: nn.Module, _args: Any, name: str = name) -> None:
                if name not in order:
                    order.append(name)

            handles.append(module.register_forward_pre_hook(note))
    try:
        first = collect_input_stats(layer, replay, select, diag_only=diag_only)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in order:
        if not any(name in group for group in groups):
            groups.append([n for n in order if first[n] is first[name]])
    for position, names in enumerate(groups):
        if position == 0:
            stats = first[names[0]]
        else:
            fresh = collect_input_stats(layer, replay, _named(names), diag_only=diag_only)
            stats = fresh[names[0]]
        yield names, stats


def _named(names: list[str]) -> Callable[[str, nn.Linear], bool]:
    wanted = set(names)
    return lambda name, _module: name in wanted


def _linears(layer: nn.Module, select: Callable[[str, nn.Linear], bool]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear) and select(n, m)]


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def _facts(
    config: PruneStep, achieved: dict[str, float], sizes: dict[str, int], obs_loss: dict[str, float], num_layers: int
) -> dict[str, Any]:
    # Per decoder layer: the zero fraction over all of its pruned weights (sizes differ, so weight them).
    per_layer: list[dict[str, Any]] = []
    for index in range(num_layers):
        prefix = f"model.layers.{index}."
        names = [n for n in achieved if n.startswith(prefix)]
        per_layer.append({"layer": index, "sparsity": round(_mean(names, achieved, sizes), 6), "modules": len(names)})
    facts: dict[str, Any] = {
        "kind": "unstructured",
        "algorithm": config.algorithm,
        "target_sparsity": config.sparsity if config.nm is None else 1 - config.nm[0] / config.nm[1],
        "pattern": config.pattern,
        "achieved_sparsity": round(_mean(list(achieved), achieved, sizes), 6),
        "layers": per_layer,
        "modules": {name: round(value, 6) for name, value in achieved.items()},
        "storage": "dense",
        "speedup": False,
        "note": STORAGE_NOTE,
    }
    if obs_loss:
        facts["sparsegpt_loss"] = {name: round(value, 6) for name, value in obs_loss.items()}
    return facts


def _mean(names: list[str], achieved: dict[str, float], sizes: dict[str, int]) -> float:
    total = sum(sizes[n] for n in names)
    return sum(achieved[n] * sizes[n] for n in names) / total if total else 0.0
