"""The quantize engine: RTN, GPTQ or AWQ weights (+ optional SmoothQuant) in compressed-tensors schemes.

``quantize(model, QuantizeStep(...), calibration=ids)`` attaches compressed-tensors quantization to
every targeted Linear (``weight_scale``/``weight_zero_point``/``input_scale`` parameters and a
fake-quantizing forward, exactly as llm-compressor leaves a model), so that

* the in-memory model's forward *is* the quantized model (honest perplexity right after), and
* :func:`workers.compression.export.save_model` writes a compressed-tensors checkpoint that
  transformers and vLLM load (pack-quantized int4/int8 weight-only, int-quantized W8A8,
  float-quantized FP8).

Weights hold their quantize-dequantized values, so the forward's re-quantization is idempotent and
the packed checkpoint reproduces the in-memory logits.

Work is kept to what each recipe needs: RTN (with dynamic activations) runs no forward at all.
Calibrated recipes run each Llama-shape decoder layer once, one group of Linears at a time
(q/k/v, o, gate/up, down: :func:`workers.compression.layerwise.staged_forward`): each group is
observed on the outputs of the groups already quantized (the GPTQ paper's "true sequential"
order), its Hessian shared by the Linears that read one input, and applied once. AWQ, which
balances a Linear against the next before quantizing either, and layers of other shapes make one
observation pass over the whole layer and a second pass of the quantized layer. SmoothQuant and
AWQ rescale the collected Hessians instead of re-running the layer.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from torch import nn

from workers.compression import heap
from workers.compression.awq import awq_search
from workers.compression.base import Callbacks, EngineError, StepOutcome, device_of, set_weight
from workers.compression.gptq import gptq_quantize
from workers.compression.hessian import InputStats, collect_input_stats
from workers.compression.layerwise import LayerBatch, decoder_layers, layerwise, run_layer
from workers.compression.matching import ModuleMatcher
from workers.compression.recipe import QuantizeStep
from workers.compression.smoothquant import apply_input_scaling, smoothquant_scales
from workers.compression.weight_quant import preload_compiled_kernels, relative_output_error, rtn

# A weight with at least this share of exact zeros is treated as pruned: its mask is preserved.
SPARSE_ZERO_FRACTION = 0.01
CALIBRATION_BATCH = 8


# ---------------------------------------------------------------- the scheme as compressed-tensors data


def weight_args(config: QuantizeStep) -> QuantizationArgs:
    """The compressed-tensors weight quantization of a step."""
    if config.scheme == "fp8":
        return QuantizationArgs(
            num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.CHANNEL, symmetric=True
        )
    if config.scheme == "w8a8":
        return QuantizationArgs(num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.CHANNEL)
    if config.group_size == "auto":
        raise ValueError("resolve group_size 'auto' against the model first (QuantizeStep.with_group_size)")
    grouped = config.group_size is not None
    actorder = ActivationOrdering.WEIGHT if (config.algorithm == "gptq" and config.act_order) else None
    return QuantizationArgs(
        num_bits=4 if config.scheme == "w4a16" else 8,
        type=QuantizationType.INT,
        strategy=QuantizationStrategy.GROUP if grouped else QuantizationStrategy.CHANNEL,
        group_size=config.group_size,
        symmetric=config.symmetric,
        actorder=actorder,
    )


def input_args(config: QuantizeStep) -> QuantizationArgs | None:
    """The activation quantization of a step (``None`` for weight-only schemes)."""
    if config.scheme == "fp8":
        return QuantizationArgs(
            num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TOKEN, symmetric=True, dynamic=True
        )
    if config.scheme == "w8a8":
        if config.static_activations:
            return QuantizationArgs(num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.TENSOR)
        return QuantizationArgs(
            num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.TOKEN, dynamic=True
        )
    return None


def build_quantization_config(config: QuantizeStep, ignored: list[str]) -> QuantizationConfig:
    """One config group targeting every ``Linear`` except the ``ignored`` module names.

    The names are the ones :func:`target_linears` left out, written in full: the checkpoint's ``ignore``
    then means the same to compressed-tensors, transformers and vLLM as the recipe's patterns meant here.
    """
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(config), input_activations=input_args(config))
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=ignored,
        quantization_status=QuantizationStatus.FROZEN,
    )


def target_linears(model: nn.Module, ignore: list[str]) -> dict[str, nn.Linear]:
    """Linears that will be quantized: all of them minus those ``ignore`` selects
    (:class:`~workers.compression.matching.ModuleMatcher`, the rule every engine shares)."""
    try:
        ignored = ModuleMatcher(ignore)
    except ValueError as exc:
        raise EngineError(f"ignore{exc}") from exc
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and not ignored(name)
    }


# ---------------------------------------------------------------- the engine


def quantize(
    model: nn.Module,
    config: QuantizeStep,
    *,
    calibration: torch.Tensor | None = None,
    callbacks: Callbacks | None = None,
    device: torch.device | str | None = None,
    budget: int | None = None,
) -> StepOutcome:
    """Quantize ``model`` in place per ``config`` and return it with facts for the report.

    ``calibration`` is ``input_ids`` ``[n, seq_len]``; required when ``config.calibration_reason is not None``
    (GPTQ, AWQ, SmoothQuant, static activations) and otherwise unused. Cancellation is checked
    between decoder layers. Raises :class:`EngineError` for unusable models/configs.

    Calibrated recipes compute on ``device`` (default: where the model is), onloading one decoder layer
    at a time when the model is elsewhere; ``budget`` caps the device bytes planned for
    (:func:`workers.compression.layerwise.layerwise`). RTN needs no forward and works where the model is.
    """
    started = time.perf_counter()
    callbacks = callbacks or Callbacks()
    run = prepare_quantization(model, config, calibration)
    try:
        layers = decoder_layers(model)
    except EngineError:
        if config.calibration_reason is not None:
            raise
        layers = nn.ModuleList()
    in_layers = {f"model.layers.{i}.": layer for i, layer in enumerate(layers)}

    if config.calibration_reason is not None:
        assert calibration is not None
        compute = torch.device(device) if device is not None else device_of(model)
        if config.algorithm == "gptq":
            preload_compiled_kernels(compute)  # while the first layer's inputs are observed
        calibrated = layerwise(
            model,
            calibration,
            run.process_layer,
            callbacks.scaled(0.0, 0.97),
            batch_size=CALIBRATION_BATCH,
            stage=run.process_stage if run.stages else None,
            inspect=run.check_scaling,
            device=compute,
            budget=budget,
            solves=config.algorithm in ("gptq", "awq"),
        )
        run.true_sequential = calibrated.staged
        run.device_memory = calibrated.memory.to_dict()
    else:
        for index, prefix in enumerate(in_layers):
            callbacks.check()
            run.quantize_uncalibrated(prefix)
            callbacks.progress((index + 1) / max(len(in_layers), 1) * 0.97, f"layer {index + 1}/{len(in_layers)}")

    # Linears outside the decoder stack (e.g. lm_head when not ignored): RTN weights; static
    # activation scales from one forward of the (already quantized) model.
    callbacks.check()
    outside = [name for name in run.targets if not any(name.startswith(p) for p in in_layers)]
    absmax: dict[str, torch.Tensor] = {}
    if outside and config.static_activations:
        assert calibration is not None
        absmax = _observe_absmax(model, {n: run.targets[n] for n in outside}, calibration)
    for name in outside:
        run.quantize_outside(name, absmax.get(name))
    run.enable_all()
    heap.trim()  # the new weights stay; the temporaries freed between them go back to the system
    callbacks.progress(1.0, "quantized")

    facts = run.facts(model, seconds=time.perf_counter() - started)
    callbacks.metrics({"quantize_seconds": facts["seconds"], "mean_output_error": facts["mean_output_error"]})
    return StepOutcome(model=model, facts=facts)


def prepare_quantization(model: nn.Module, config: QuantizeStep, calibration: torch.Tensor | None) -> _Run:
    """Check ``model``/``config``/``calibration``, attach the compressed-tensors scheme to every targeted
    Linear (switched off until its qparams are set) and return the per-call state.

    Works on a model whose tensors live on the ``meta`` device too (the streaming engine).
    """
    if _is_quantized(model):
        raise EngineError("model is already quantized; quantize a full-precision model")
    targets = target_linears(model, config.ignore)
    if not targets:
        raise EngineError("no Linear layer left to quantize after 'ignore'")
    config = config.with_group_size([module.in_features for module in targets.values()])
    _check_group_divisibility(targets, config.group_size)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and head in targets.values() and getattr(model.config, "tie_word_embeddings", False):
        # One Parameter would hold two modules' weights: the compressed checkpoint would store the
        # head packed and the embedding not at all, and transformers could not load it.
        raise EngineError("lm_head is tied to the input embeddings and cannot be quantized; add 'lm_head' to ignore")
    if config.calibration_reason is not None:
        if calibration is None:
            raise EngineError(f"quantize {config.scheme} ({config.calibration_reason}) needs calibration data")
        if calibration.ndim != 2 or calibration.shape[0] == 0:
            raise EngineError("calibration must be input_ids of shape [num_samples, seq_len]")
    ignored = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets)
    apply_quantization_config(model, build_quantization_config(config, ignored), show_progress=False)
    # Until a module's qparams are set its scale parameters hold garbage: keep it in float.
    for module in targets.values():
        setattr(module, "quantization_enabled", False)  # noqa: B010 - compressed-tensors' runtime flag
    return _Run(config, weight_args(config), input_args(config), targets)


class _Run:
    """State of one quantize call: what to quantize and the per-module numbers for the report."""

    def __init__(
        self,
        config: QuantizeStep,
        w_args: QuantizationArgs,
        a_args: QuantizationArgs | None,
        targets: dict[str, nn.Linear],
    ) -> None:
        self.config = config
        self.w_args = w_args
        self.a_args = a_args
        self.targets = targets
        self.true_sequential = False  # layers quantized group by group (layerwise.staged_forward)
        self.output_errors: dict[str, float] = {}
        self.weight_errors: dict[str, float] = {}
        self.rtn_fallback: list[str] = []
        self.sparse_modules: list[str] = []
        # Producers (a norm, or v_proj / up_proj) whose rescaling changed the first layer's output:
        # their mappings are left out everywhere (see check_scaling). None: not checked.
        self.scaling_skipped: list[str] | None = None
        self.device_memory: dict[str, Any] | None = None  # the layer loop's device and memory (layerwise)

    def check_scaling(self, layer: nn.Module, batch: LayerBatch) -> None:
        """Try every SmoothQuant/AWQ mapping of the first decoder layer on one calibration batch, with
        random scales, and leave out those that change the layer's output.

        The mappings go by module names (a norm feeding q/k/v or gate/up; v→o, up→down). Layers with
        those names can still be wired otherwise: a ``(1 + w)`` norm (Gemma), a post-norm (Olmo2), a
        parallel attention/MLP block fed by one norm (Phi, Cohere), an activation on ``up_proj``
        (Nemotron), a norm before ``o_proj``. Rescaling there would change the float model itself.
        """
        if self.config.smoothquant is None and self.config.algorithm != "awq":
            return
        mappings = _norm_mappings(layer) + (_linear_mappings(layer) if self.config.algorithm == "awq" else [])
        name_of = {id(module): name for name, module in layer.named_modules()}
        self.scaling_skipped = []
        # In float32 whatever the model's dtype: bf16 rounding alone would move the output by ~1e-2.
        reference = copy.deepcopy(layer).float()
        batch = LayerBatch(hidden=batch.hidden.float(), kwargs=_float32(batch.kwargs))
        with torch.no_grad():
            expected = run_layer(reference, [batch])[0]
            for previous, consumers in mappings:
                probe = copy.deepcopy(reference)
                width = consumers[0][1].in_features
                # Drawn on the CPU from a seeded CPU generator, the same probe on every device; moved below.
                generator = torch.Generator().manual_seed(width)
                scales = torch.empty(width, device="cpu").uniform_(-0.7, 0.7, generator=generator).exp()
                linears = [probe.get_submodule(n) for n, _ in consumers]
                apply_input_scaling(
                    probe.get_submodule(name_of[id(previous)]), [m for m in linears if isinstance(m, nn.Linear)], scales
                )
                actual = run_layer(probe, [batch])[0]
                change = float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))
                if not change < 1e-3:  # float rounding is ~1e-6 here; a broken mapping changes it by 1e-2..1
                    self.scaling_skipped.append(name_of[id(previous)])

    def _scalable(
        self, mappings: list[tuple[nn.Module, list[tuple[str, nn.Linear]]]], layer: nn.Module
    ) -> list[tuple[nn.Module, list[tuple[str, nn.Linear]]]]:
        if not self.scaling_skipped:
            return mappings
        name_of = {id(module): name for name, module in layer.named_modules()}
        return [(p, c) for p, c in mappings if name_of.get(id(p)) not in self.scaling_skipped]

    def names_under(self, prefix: str) -> list[str]:
        return [name for name in self.targets if name.startswith(prefix)]

    def enable_all(self) -> None:
        """Switch on the quantized forward of every target (after the last layer)."""
        for module in self.targets.values():
            setattr(module, "quantization_enabled", True)  # noqa: B010

    def quantize_uncalibrated(self, prefix: str) -> None:
        """RTN every targeted Linear under ``prefix`` (``model.layers.3.``); no data needed."""
        for name in self.names_under(prefix):
            self.quantize_modules([name], None, {})

    def quantize_outside(self, name: str, act_absmax: torch.Tensor | None) -> None:
        """A Linear outside the decoder stack (e.g. lm_head): RTN, recorded as a fallback for calibrated algorithms."""
        self.quantize_modules([name], None, {name: act_absmax} if act_absmax is not None else {})
        if self.config.algorithm != "rtn":
            self.rtn_fallback.append(name)

    def facts(self, model: nn.Module, seconds: float) -> dict[str, Any]:
        """What the report says about this quantization."""
        config, w_args = self.config, self.w_args
        all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        errors = self.output_errors
        return {
            "scheme": config.scheme,
            "algorithm": config.algorithm,
            "bits": w_args.num_bits,
            "weight_type": str(w_args.type),
            "group_size": config.group_size,
            "symmetric": config.symmetric,
            "activations": config.activations
            if config.scheme == "w8a8"
            else ("dynamic" if config.scheme == "fp8" else None),
            "smoothquant_alpha": config.smoothquant.alpha if config.smoothquant else None,
            "act_order": config.act_order if config.algorithm == "gptq" else None,
            "clip_search": config.clip_search if config.algorithm == "gptq" else None,
            "true_sequential": self.true_sequential,
            "scaling_skipped": self.scaling_skipped,
            "quantized_modules": len(self.targets),
            "ignored_modules": [n for n in all_linears if n not in self.targets],
            "output_errors": errors,
            "mean_output_error": (sum(errors.values()) / len(errors)) if errors else None,
            "weight_errors": self.weight_errors,
            "rtn_fallback_modules": self.rtn_fallback,
            "sparsity_preserved_modules": self.sparse_modules,
            "device_memory": self.device_memory,
            "seconds": round(seconds, 3),
        }

    # -------------------------------------------------------- one decoder layer (calibrated recipes)

    @property
    def need_hessian(self) -> bool:
        return self.config.algorithm in ("gptq", "awq")

    @property
    def need_absmax(self) -> bool:
        return self.config.smoothquant is not None or self.config.static_activations

    @property
    def stages(self) -> bool:
        """Whether a layer may be quantized one group of Linears at a time (:meth:`process_stage`):
        GPTQ and RTN need only each group's own input; AWQ balances a Linear against the next one
        (v/o, up/down) before either is quantized, so it observes the whole layer first."""
        return self.config.algorithm != "awq"

    def process_layer(self, index: int, prefix: str, layer: nn.Module, replay: Any) -> None:
        """Observe the layer once, then quantize its Linears (:meth:`_quantize_observed`)."""
        local = {name[len(prefix) + 1 :]: name for name in self.names_under(prefix + ".")}
        absmax: dict[str, torch.Tensor] = {}
        stats: dict[str, InputStats] = {}
        with _record_absmax(layer, absmax, enabled=self.need_absmax):
            if self.need_hessian:
                # The absmax hooks need the whole forward; the Hessians alone do not.
                stats = collect_input_stats(
                    layer,
                    replay,
                    select=lambda n, _m: n in local,
                    stop_early=not self.need_absmax,
                    output_energy=True,
                )
            else:
                with torch.no_grad():
                    replay()
        self._quantize_observed(layer, local, stats, absmax)

    def process_stage(
        self, index: int, prefix: str, layer: nn.Module, names: list[str], inputs: Iterable[torch.Tensor]
    ) -> None:
        """Observe the one input of the Linears ``names`` of a layer and quantize them (the staged flow
        of :func:`workers.compression.layerwise.staged_forward`)."""
        local = {short: f"{prefix}.{short}" for short in names if f"{prefix}.{short}" in self.targets}
        if not local:
            return
        stats: InputStats | None = None
        peak: torch.Tensor | None = None
        for x in inputs:  # iterable once: both statistics in one pass
            if self.need_absmax:
                peak = _running_absmax(peak, x)
            if self.need_hessian:
                stats = stats or InputStats.empty(x.shape[-1], x.device, list(local))
                stats.add(x)
        if stats is not None:
            stats.finish()
        self._quantize_observed(
            layer,
            local,
            {short: stats for short in local} if stats is not None else {},
            {short: peak for short in local} if peak is not None else {},
        )

    def _quantize_observed(
        self,
        layer: nn.Module,
        local: dict[str, str],
        stats: dict[str, InputStats],
        absmax: dict[str, torch.Tensor],
    ) -> None:
        """Rescale (SmoothQuant/AWQ) what was observed, quantize the Linears ``local`` (short name to
        full name) and enable them."""
        config = self.config
        hessians = _HessianCache(stats)

        if config.smoothquant is not None:
            for previous, consumers in self._scalable(_norm_mappings(layer), layer):
                names = [n for n, _ in consumers]
                # The consumers share one input: any of them observed it (an ignored one may not have).
                act = next((absmax[n] for n in names if n in absmax), None)
                if act is None:
                    continue
                scales = smoothquant_scales(act, [m.weight for _, m in consumers], config.smoothquant.alpha)
                apply_input_scaling(previous, [m for _, m in consumers], scales)
                for n in names:
                    if n in absmax:
                        absmax[n] = absmax[n] / scales.to(absmax[n].device)
                hessians.rescale(names, scales)
        rescaled_outputs: set[int] = set()  # Linears whose outputs a balancing divided: energies stale
        if config.algorithm == "awq":
            for previous, consumers in self._scalable(_norm_mappings(layer) + _linear_mappings(layer), layer):
                quantized = [(n, m) for n, m in consumers if n in local]
                if not quantized:
                    continue
                hessian = hessians.get(quantized[0][0])
                if hessian is None:
                    continue
                search = awq_search([m.weight for _, m in quantized], hessian, self.w_args)
                if search.ratio is not None:
                    apply_input_scaling(previous, [m for _, m in consumers], search.scales)
                    hessians.rescale([n for n, _ in consumers], search.scales)
                    rescaled_outputs.add(id(previous))

        absmax_of = {name: absmax[short] for short, name in local.items() if short in absmax}
        output_scales = {
            local[short]: value
            for short, stat in stats.items()
            if id(self.targets[local[short]]) not in rescaled_outputs
            and (value := stat.output_scale(short)) is not None
        }
        for shorts in self._solve_groups(local, stats):
            self.quantize_modules([local[n] for n in shorts], hessians.get(shorts[0]), absmax_of, output_scales)

    def _solve_groups(self, local: dict[str, str], stats: dict[str, InputStats]) -> list[list[str]]:
        """The layer's Linears (short names) in groups quantized together: under GPTQ, those reading one
        input (q/k/v, gate/up) whose masks are handled alike; otherwise one by one."""
        if self.config.algorithm != "gptq":
            return [[short] for short in local]
        groups: dict[tuple[object, bool], list[str]] = {}
        for short, name in local.items():
            stat = stats.get(short)  # None: the module never ran, so it goes alone (RTN)
            key = (id(stat) if stat is not None else short, _is_sparse(self.targets[name].weight))
            groups.setdefault(key, []).append(short)
        return list(groups.values())

    # -------------------------------------------------------- Linears

    def quantize_modules(
        self,
        names: list[str],
        hessian: torch.Tensor | None,
        act_absmax: dict[str, torch.Tensor],
        output_scales: dict[str, float] | None = None,
    ) -> None:
        """Quantize the weights of Linears that read one input (GPTQ when a Hessian is given, else RTN)
        and switch them on. ``output_scales``: ``tr(WHWᵀ)`` per module where the observation measured it.

        GPTQ treats every output row on its own given ``H``, so the stacked rows of q/k/v (or gate/up)
        are solved at once: the same result as one solve per module, with one Cholesky factorisation
        and one column loop instead of three.
        """
        config = self.config
        modules = [self.targets[name] for name in names]
        with torch.no_grad():
            weights = [module.weight.data for module in modules]
            preserve = _is_sparse(weights[0])
            if preserve:
                self.sparse_modules.extend(names)
            stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
            row_loss: torch.Tensor | None = None
            if config.algorithm == "gptq" and hessian is not None:
                result = gptq_quantize(
                    stacked,
                    hessian,
                    self.w_args,
                    block_size=config.block_size,
                    dampening_frac=config.dampening_frac,
                    act_order=config.act_order,
                    preserve_zeros=preserve,
                    clip_search=config.clip_search,
                    name=", ".join(names),
                )
                quantized, scale, zero_point = result.weight, result.scale, result.zero_point
                # GPTQ tracks tr(ΔHΔᵀ)/2 itself (exact against its damped H unless a mask bends the updates).
                row_loss = None if preserve else result.row_loss
            else:
                quantized, scale, zero_point = rtn(stacked, self.w_args)
            rows = [weight.shape[0] for weight in weights]
            parts = zip(
                names,
                modules,
                weights,
                quantized.split(rows),
                scale.split(rows),
                zero_point.split(rows),
                row_loss.split(rows) if row_loss is not None else [None] * len(rows),
                strict=True,
            )
            for name, module, weight, q, s, z, loss in parts:
                self._record_errors(name, weight, q, hessian, loss, (output_scales or {}).get(name))
                set_weight(module, q)
                _set_param(module, "weight_scale", s)
                if getattr(module, "weight_zero_point", None) is not None:
                    _set_param(module, "weight_zero_point", z)
                if self.a_args is not None and not self.a_args.dynamic:
                    self._set_static_input_scale(name, module, act_absmax.get(name))
                # Weight-only: the weight already holds its grid values, so the fake-quantizing forward
                # would give the very same outputs at the cost of re-quantizing it on every calibration
                # batch; switch it on at the end (enable_all). Quantized activations must act on later
                # layers now.
                setattr(module, "quantization_enabled", self.a_args is not None)  # noqa: B010

    def _record_errors(
        self,
        name: str,
        weight: torch.Tensor,
        quantized: torch.Tensor,
        hessian: torch.Tensor | None,
        row_loss: torch.Tensor | None,
        output_scale: float | None,
    ) -> None:
        """Relative output error (from ``H``) and relative weight error of one Linear, for the report."""
        if hessian is not None:
            error = 2 * float(row_loss.sum()) if row_loss is not None else None
            self.output_errors[name] = relative_output_error(
                weight, quantized, hessian, error=error, scale=output_scale
            )
        w = weight.to(torch.float32)
        delta = (quantized.to(torch.float32) - w).pow(2).sum()
        self.weight_errors[name] = float(delta / w.pow(2).sum().clamp(min=1e-30))

    def _set_static_input_scale(self, name: str, module: nn.Linear, act_absmax: torch.Tensor | None) -> None:
        """Static per-tensor activation qparams from the calibration maximum of the module's input."""
        assert self.a_args is not None
        if act_absmax is None:
            raise EngineError(f"{name}: no calibration activations reached this layer for static scales")
        peak = act_absmax.max().reshape(1).to(torch.float32)
        a_scale, a_zp = calculate_qparams(-peak, peak, self.a_args)
        _set_param(module, "input_scale", a_scale)
        if getattr(module, "input_zero_point", None) is not None:
            _set_param(module, "input_zero_point", a_zp)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into a qparam that compressed-tensors attached to ``module`` (its shape and dtype)."""
    param: torch.Tensor = getattr(module, name)
    param.data.copy_(value.reshape(param.shape))


def _is_sparse(weight: torch.Tensor) -> bool:
    """Whether a weight looks pruned (its mask is then preserved)."""
    return weight.numel() - int(torch.count_nonzero(weight)) >= SPARSE_ZERO_FRACTION * weight.numel()


class _HessianCache:
    """``2/n XᵀX`` per Linear, computed once per shared input and rescaled in place by smoothing."""

    def __init__(self, stats: dict[str, InputStats]) -> None:
        self.stats = stats
        self._cache: dict[int, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        stat = self.stats.get(name)
        if stat is None:
            return None
        key = id(stat)
        if key not in self._cache:
            self._cache[key] = stat.hessian
        return self._cache[key]

    def rescale(self, names: list[str], scales: torch.Tensor) -> None:
        """Inputs divided by ``s``: ``H ← diag(1/s) H diag(1/s)``, once per shared input."""
        done: set[int] = set()
        inv = 1.0 / scales.to(torch.float32)
        for name in names:
            stat = self.stats.get(name)
            if stat is None or id(stat) in done:
                continue
            done.add(id(stat))
            inv_d = inv.to(stat.xtx.device)
            stat.xtx.mul_(inv_d.unsqueeze(0)).mul_(inv_d.unsqueeze(1))
            self._cache.pop(id(stat), None)


def _float32(value: Any) -> Any:
    """``value`` with its floating-point tensors (also inside tuples, lists and dicts) in float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def _norm_mappings(layer: nn.Module) -> list[tuple[nn.Module, list[tuple[str, nn.Linear]]]]:
    """(norm, Linears it feeds) pairs of a Llama-style decoder layer; empty where the layout differs."""
    mappings = []
    for norm_name, parent, children in (
        ("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
        ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")),
    ):
        norm = getattr(layer, norm_name, None)
        block = getattr(layer, parent, None)
        linears = [(f"{parent}.{c}", getattr(block, c, None)) for c in children]
        if (
            norm is not None
            and getattr(norm, "weight", None) is not None
            and all(isinstance(m, nn.Linear) for _, m in linears)
        ):
            mappings.append((norm, [(n, m) for n, m in linears if isinstance(m, nn.Linear)]))
    return mappings


def _linear_mappings(layer: nn.Module) -> list[tuple[nn.Module, list[tuple[str, nn.Linear]]]]:
    """(producer Linear, consumer Linear) pairs AWQ may balance: v→o (only without GQA), up→down."""
    mappings: list[tuple[nn.Module, list[tuple[str, nn.Linear]]]] = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    v, o = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None)
    if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and v.out_features == o.in_features:
        mappings.append((v, [("self_attn.o_proj", o)]))
    up, down = getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)
    if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
        mappings.append((up, [("mlp.down_proj", down)]))
    return mappings


def _running_absmax(peak: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max |x|`` over ``x``'s last dimension, merged with the running ``peak``."""
    top = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)
    return top if peak is None else torch.maximum(peak, top)


@contextmanager
def _record_absmax(layer: nn.Module, out: dict[str, torch.Tensor], enabled: bool) -> Iterator[None]:
    """Record per-input-channel ``max |x|`` of every Linear in ``layer`` while the block runs."""
    if not enabled:
        yield
        return
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):

            def hook(_m: nn.Module, args: tuple[Any, ...], _o: Any, name: str = name) -> None:
                out[name] = _running_absmax(out.get(name), args[0].detach())

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _observe_absmax(
    model: nn.Module, modules: dict[str, nn.Linear], calibration: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-channel input maxima of a few Linears from full forwards (only for Linears outside the layers)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], _o: Any, name: str = name) -> None:
            out[name] = _running_absmax(out.get(name), args[0].detach())

        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, calibration.shape[0], CALIBRATION_BATCH):
                model(input_ids=calibration[start : start + CALIBRATION_BATCH].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out


def _check_group_divisibility(targets: dict[str, nn.Linear], group_size: int | str | None) -> None:
    if not isinstance(group_size, int):
        return
    bad = [f"{name} (in_features={m.in_features})" for name, m in targets.items() if m.in_features % group_size]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise EngineError(
            f"group_size {group_size} does not divide the input width of: {shown}. "
            "Use 'auto', a smaller group_size, per-channel (group_size null), or add them to 'ignore'."
        )


def _is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())
