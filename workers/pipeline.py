"""One compression job's work, independent of where its inputs came from.

The service's runner and the local ``modelpress compress`` command both call :func:`run_pipeline`:
load the model safely, measure it, run the steps in order, save, measure again, write the report.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.compression.base import Callbacks, EngineError, StepCancelled, StepOutcome
from workers.compression.device import (
    DeviceUnavailableError,
    cuda_environment,
    cuda_peak,
    fits_on,
    load_dtype,
    resolve_device,
)
from workers.compression.evaluate import evaluate
from workers.compression.export import inspect_model_dir, load_model, save_model
from workers.compression.preflight import ModelPreflight
from workers.compression.recipe import (
    DistillStep,
    PruneStep,
    QuantizeStep,
    Recipe,
    export_type,
    group_size_problem,
)
from workers.compression.weight_quant import gguf_exact_scales
from workers.reporting import Report, build_report, write_report_files
from workers.texts import JobTexts, prepare_texts

StepHook = Callable[[int, str, dict[str, Any]], None]
"""``on_step(index, status, extra)``: a step moved to ``running`` / ``succeeded`` / ``failed`` / ``cancelled``."""


@dataclass
class PipelineInputs:
    """Local paths of everything a job reads (the runner downloads them; the CLI takes them as given)."""

    model_dir: Path
    calibration_files: list[Path] = field(default_factory=list)
    evaluation_files: list[Path] = field(default_factory=list)
    training_files: list[Path] = field(default_factory=list)
    student_dirs: dict[int, Path] = field(default_factory=dict)
    checkpoint_dirs: dict[int, Path] = field(default_factory=dict)
    on_checkpoint: Callable[[int, Path], None] | None = None
    max_model_bytes: int | None = None
    memory_budget_bytes: int | None = None
    measure_speed: bool = True
    hardware: str = "auto"
    """The job's ``hardware``: where the engines compute (:func:`workers.compression.device.resolve_device`)."""

    def memory_budget(self) -> int:
        """Bytes a job's model may take at the pipeline's peak: the worker's setting, else the machine's memory."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        import psutil

        return int(psutil.virtual_memory().total)

    def texts(self, tokenizer: Any, recipe: Recipe) -> JobTexts:
        """The job's texts tokenised (:func:`workers.texts.prepare_texts`)."""
        return prepare_texts(tokenizer, recipe, self.calibration_files, self.evaluation_files, self.training_files)


@dataclass
class _StepContext:
    """What an engine call may need besides its model and config."""

    index: int
    steps: list[Any]
    tokenizer: Any
    texts: JobTexts
    inputs: PipelineInputs
    out_dir: Path
    callbacks: Callbacks
    device: torch.device


def _quantize_step(model: nn.Module, step: Any, ctx: _StepContext) -> StepOutcome:
    from workers.compression.quantize import quantize

    return quantize(model, step, calibration=ctx.texts.calibration, callbacks=ctx.callbacks, device=ctx.device)


def _prune_step(model: nn.Module, step: Any, ctx: _StepContext) -> StepOutcome:
    from workers.compression.prune import prune

    return prune(model, step, calibration=ctx.texts.calibration, callbacks=ctx.callbacks, device=ctx.device)


def _distill_step(model: nn.Module, step: Any, ctx: _StepContext) -> StepOutcome:
    from workers.compression.distill import build_student, distill

    inputs, stream = ctx.inputs, ctx.texts.train_stream
    if stream is None:
        raise EngineError(f"steps[{ctx.index}] (distill) needs training text")
    # The teacher is always the job's input model, also after earlier steps changed `model`.
    teacher, _ = load_model(
        inputs.model_dir,
        max_bytes=inputs.max_model_bytes,
        should_stop=ctx.callbacks.should_stop,
        dtype=load_dtype(ctx.device),
    )
    teacher.to(ctx.device)  # the student trains where its teacher is
    student = build_student(
        teacher,
        step.student,
        student_dir=inputs.student_dirs.get(ctx.index),
        max_bytes=inputs.max_model_bytes,
        previous_model=model,
        calibration=ctx.texts.calibration,
        seed=step.seed,
        should_stop=ctx.callbacks.should_stop,
    )
    cut = int(stream.numel() * (1 - step.eval_fraction))
    return distill(
        teacher,
        student,
        step,
        train_ids=stream[:cut],
        eval_ids=stream[cut:] if stream.numel() - cut >= step.seq_len else None,
        pad_token_id=ctx.tokenizer.pad_token_id,
        checkpoint_dir=inputs.checkpoint_dirs.get(ctx.index),
        on_checkpoint=partial(inputs.on_checkpoint, ctx.index) if inputs.on_checkpoint is not None else None,
        world_size=torch.cuda.device_count() if ctx.device.type == "cuda" else 1,  # a rank per GPU of the worker
        callbacks=ctx.callbacks,
    )


def _export_step(model: nn.Module, step: Any, ctx: _StepContext) -> StepOutcome:
    from workers.compression.gguf import export_gguf

    try:
        gguf_type = export_type(ctx.steps, ctx.index)
    except ValueError as exc:  # refused at submission; a recipe file reaches here unchecked only by hand
        raise EngineError(f"steps[{ctx.index}] (export): {exc}") from exc
    path = ctx.out_dir / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = export_gguf(
        model, ctx.tokenizer, path, gguf_type, full_precision=step.full_precision, callbacks=ctx.callbacks
    )
    return StepOutcome(model=model, facts=facts)


ENGINES: dict[str, Callable[[nn.Module, Any, _StepContext], StepOutcome]] = {
    "quantize": _quantize_step,
    "prune": _prune_step,
    "distill": _distill_step,
    "export": _export_step,
}
"""A step's ``method`` → the call of its engine (the one place a step type meets its engine)."""


def check_shapes(recipe: Recipe, model: nn.Module) -> None:
    """Refuse, before anything is measured, a quantize step whose group size cannot fit the model's Linears
    (up to the first step that changes shapes: its own engine checks what follows)."""
    from workers.compression.quantize import target_linears

    for index, step in enumerate(recipe.steps):
        if isinstance(step, DistillStep) or (isinstance(step, PruneStep) and step.algorithm == "structured"):
            return
        if isinstance(step, QuantizeStep):
            widths = [linear.in_features for linear in target_linears(model, step.ignore).values()]
            problem = group_size_problem(step.group_size, widths)
            if problem is not None:
                raise EngineError(f"steps[{index}] (quantize): {problem}")


def _labelled_progress(callbacks: Callbacks, label: str, fraction: float, message: str) -> None:
    callbacks.progress(fraction, f"{label}: {message}")


def _step_metrics(callbacks: Callbacks, index: int, data: dict[str, Any]) -> None:
    callbacks.metrics({"step": index, **data})


def _load_on(
    device: torch.device, model_dir: Path, callbacks: Callbacks, *, max_bytes: int | None = None
) -> tuple[Any, Any]:
    """Load a model for ``device`` (its dtype policy) and put it there when it fits; else it stays in host
    memory and the engines onload one layer at a time."""
    model, tokenizer = load_model(
        model_dir, max_bytes=max_bytes, should_stop=callbacks.should_stop, dtype=load_dtype(device)
    )
    if fits_on(model, device):
        model.to(device)
    return model, tokenizer


def run_pipeline(
    recipe: Recipe,
    inputs: PipelineInputs,
    out_dir: Path,
    callbacks: Callbacks | None = None,
    on_step: StepHook | None = None,
) -> Report:
    """Run ``recipe`` on the model in ``inputs.model_dir``; write ``out_dir/{model/, report.json, report.png,
    README.md}`` (+ ``model.gguf`` for an export step) and return the report. Raises :class:`EngineError` for
    problems the user can fix and ``StepCancelled`` when ``callbacks.should_stop()`` turns true.

    The model is checked before a byte of its weights is read (:func:`inspect_model_dir`: config against
    safetensors headers, and its float32 size against the worker's memory budget) and, once changed,
    before it is written (non-finite weights refused)."""
    callbacks = callbacks or Callbacks()
    on_step = on_step or (lambda _i, _s, _e: None)
    started = time.perf_counter()

    try:
        device = resolve_device(inputs.hardware)
    except DeviceUnavailableError as exc:
        raise EngineError(f"the job asks for a GPU, but this worker has none: {exc}") from exc
    callbacks.progress(0.0, "loading model")
    checked = inspect_model_dir(inputs.model_dir, max_bytes=inputs.max_model_bytes)
    if use_low_memory(recipe, checked):
        return _run_low_memory(recipe, inputs, out_dir, callbacks, on_step, started)
    checked.check_memory(inputs.memory_budget(), IN_MEMORY_FACTOR)
    model, tokenizer = _load_on(device, inputs.model_dir, callbacks, max_bytes=inputs.max_model_bytes)
    if tokenizer is None:
        raise EngineError("the model directory has no tokenizer (tokenizer.json / tokenizer_config.json)")
    texts = inputs.texts(tokenizer, recipe)
    check_shapes(recipe, model)

    callbacks.progress(0.01, "measuring the original model")
    measure = partial(evaluate, tokenizer=tokenizer, eval_ids=texts.eval_ids, measure_speed=inputs.measure_speed)
    baseline = measure(model, model_dir=inputs.model_dir, callbacks=callbacks.scaled(0.01, 0.1))
    # Beside the output (the job's work directory), not in /tmp: an F16 export is twice the model's parameters.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".runtime-", dir=out_dir.parent) as scratch:
        runtime = GgufRuntime.prepare(recipe, model, tokenizer, inputs, Path(scratch), callbacks.scaled(0.1, 0.12))

        def run_one(index: int, step: Any, current: Any, step_callbacks: Callbacks) -> StepOutcome:
            ctx = _StepContext(index, recipe.steps, tokenizer, texts, inputs, out_dir, step_callbacks, device)
            return ENGINES[step.method](current, step, ctx)

        with gguf_exact_scales() if runtime.exports else nullcontext():
            step_records, model = _run_steps(
                recipe, run_one, callbacks.scaled(0.12, 0.85), on_step, model, device=device
            )

        callbacks.check()
        callbacks.progress(0.85, "saving the compressed model")
        model_out = out_dir / "model"
        save_model(model, tokenizer, model_out)
        # Measure the artifact as a user gets it: reloaded from disk by transformers. This also proves it loads.
        callbacks.progress(0.88, "measuring the compressed model")
        del model
        reloaded, _ = _load_on(device, model_out, callbacks)
        result = measure(reloaded, model_dir=model_out, callbacks=callbacks.scaled(0.88, 0.93))
        if result.perplexity is not None and math.isnan(result.perplexity):
            raise EngineError("the compressed model's outputs are not finite (its perplexity is NaN)")
        runtimes = runtime.measure(out_dir, texts.eval_ids, callbacks.scaled(0.93, 0.99))
    report = build_report(
        baseline,
        result,
        step_records,
        duration_s=round(time.perf_counter() - started, 3),
        evaluation_info=texts.evaluation_info(),
        runtimes=runtimes,
        notes=[*texts.warnings, *runtime.notes],
        environment=cuda_environment(),
    )
    write_report_files(report, out_dir)
    callbacks.progress(1.0, "done")
    return report


def _run_steps(
    recipe: Recipe,
    run_one: Callable[[int, Any, Any, Callbacks], StepOutcome],
    callbacks: Callbacks,
    on_step: StepHook,
    model: Any = None,
    *,
    device: torch.device | None = None,
) -> tuple[list[dict[str, Any]], Any]:
    """The step loop of both memory modes: ``run_one(index, step, model, callbacks)`` runs a step on the model
    the steps before it made (``model`` at first); here are each step's progress share and label, its state
    changes through ``on_step`` and its record for the report (with the step's CUDA peak memory when the
    steps compute on a CUDA ``device``). Returns the records and the last model."""
    records: list[dict[str, Any]] = []
    span = 1.0 / len(recipe.steps)
    for index, step in enumerate(recipe.steps):
        callbacks.check()
        on_step(index, "running", {})
        begin = time.perf_counter()
        label = f"step {index + 1}/{len(recipe.steps)} ({step.method})"
        labelled = Callbacks(
            progress=partial(_labelled_progress, callbacks.scaled(index * span, (index + 1) * span), label),
            should_stop=callbacks.should_stop,
            metrics=partial(_step_metrics, callbacks, index),
        )
        try:
            with cuda_peak(device) as peak:
                outcome = run_one(index, step, model, labelled)
        except StepCancelled:
            on_step(index, "cancelled", {"duration_s": round(time.perf_counter() - begin, 3)})
            raise
        except BaseException:
            on_step(index, "failed", {"duration_s": round(time.perf_counter() - begin, 3)})
            raise
        model = outcome.model
        duration = round(time.perf_counter() - begin, 3)
        on_step(index, "succeeded", {"duration_s": duration})
        params = step.model_dump(mode="json")
        record = {"method": step.method, "params": params, "duration_s": duration, "details": outcome.facts}
        if peak.bytes is not None:
            record["peak_device_memory_bytes"] = peak.bytes
        records.append(record)
    return records, model


@dataclass
class GgufRuntime:
    """An export step's serving-runtime measurement: the original model exported unquantized (F16) before the
    steps run, then both files run by llama.cpp (the report's ``runtimes``), so that a speed-up compares like
    with like. Nothing when the recipe exports nothing; a note instead when llama.cpp cannot measure."""

    exports: bool
    baseline: Path | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def prepare(
        cls, recipe: Recipe, model: nn.Module, tokenizer: Any, inputs: PipelineInputs, scratch: Path, cb: Callbacks
    ) -> GgufRuntime:
        runtime = cls(exports=any(step.method == "export" for step in recipe.steps))
        if not runtime.exports:
            return runtime
        if not inputs.measure_speed:
            runtime.notes.append("The GGUF file was not measured in llama.cpp (speed measurement was off).")
            return runtime
        from workers.compression.gguf import export_gguf
        from workers.compression.llamacpp import load_llama_cpp

        try:
            load_llama_cpp()
        except EngineError as exc:
            runtime.notes.append(f"The GGUF file was not measured in llama.cpp: {exc}")
            return runtime
        cb.progress(0.0, "exporting the original model to GGUF (F16) for the runtime baseline")
        runtime.baseline = scratch / "baseline-f16.gguf"
        export_gguf(model, tokenizer, runtime.baseline, "f16", callbacks=cb)
        return runtime

    def measure(self, out_dir: Path, eval_ids: torch.Tensor | None, cb: Callbacks) -> dict[str, Any] | None:
        if self.baseline is None:
            return None
        if eval_ids is None:
            self.notes.append("The GGUF file was not measured in llama.cpp: no evaluation text to score it on.")
            return None
        from workers.compression.llamacpp import measure_gguf

        cb.progress(0.0, "measuring the GGUF files in llama.cpp")
        return {"llama.cpp": measure_gguf(out_dir / "model.gguf", self.baseline, eval_ids, callbacks=cb)}


# ---------------------------------------------------------------- low-memory mode (layer streaming)

# The in-memory path peaks near twice the float32 model (the model, plus a copy while saving and
# reloading); below that much free memory, "auto" streams instead.
IN_MEMORY_FACTOR = 2.0

LOW_MEMORY_NOTE = (
    "Low-memory mode: the model was quantized one decoder layer at a time from its shards and was never "
    "whole in memory, so speed, peak memory and the text sample were not measured. Perplexity before and "
    "after was scored in the same layer-by-layer pass (the in-memory quantized weights, which the "
    "checkpoint stores exactly)."
)


def use_low_memory(recipe: Recipe, checked: ModelPreflight) -> bool:
    """Whether to stream: as the recipe says, or (``null``) when a one-quantize-step recipe's model
    would not fit in the memory free now."""
    if recipe.low_memory is not None:
        return recipe.low_memory
    if len(recipe.steps) != 1 or not isinstance(recipe.steps[0], QuantizeStep):
        return False
    import psutil

    return IN_MEMORY_FACTOR * checked.float32_bytes > psutil.virtual_memory().available


def _run_low_memory(
    recipe: Recipe,
    inputs: PipelineInputs,
    out_dir: Path,
    callbacks: Callbacks,
    on_step: StepHook,
    started: float,
) -> Report:
    """:func:`run_pipeline` for a one-quantize-step recipe, through the layer-streaming engine."""
    from workers.compression.evaluate import count_parameters, directory_size
    from workers.compression.export import load_tokenizer
    from workers.compression.streaming import StreamResult, meta_model, quantize_streaming

    assert isinstance(recipe.steps[0], QuantizeStep)
    callbacks.progress(0.0, "reading the model config (low-memory mode)")
    tokenizer = load_tokenizer(inputs.model_dir)
    if tokenizer is None:
        raise EngineError("the model directory has no tokenizer (tokenizer.json / tokenizer_config.json)")
    texts = inputs.texts(tokenizer, recipe)
    original_params, original_mix = count_parameters(meta_model(inputs.model_dir))

    model_out = out_dir / "model"
    streamed: list[StreamResult] = []

    def run_one(_index: int, step: Any, _model: Any, step_callbacks: Callbacks) -> StepOutcome:
        outcome, stream = quantize_streaming(
            inputs.model_dir, step, model_out, calibration=texts.calibration, eval_ids=texts.eval_ids,
            callbacks=step_callbacks,
        )  # fmt: skip
        streamed.append(stream)
        return outcome

    step_records, _ = _run_steps(recipe, run_one, callbacks.scaled(0.02, 0.97), on_step)
    stream = streamed[0]
    params, mix = count_parameters(stream.model)

    def metrics(perplexity: float | None, parameters: int, dtypes: dict[str, int], size: int) -> dict[str, Any]:
        return {
            "perplexity": perplexity,
            "parameters": parameters,
            "dtypes": dtypes,
            "size_bytes": size,
            "size_method": "directory",
            "prefill_tokens_per_s": None,
            "decode_tokens_per_s": None,
            "peak_memory_bytes": None,
            "sample": None,
            "device": "cpu (layer streaming)",
            "eval_windows": int(texts.eval_ids.shape[0]) if texts.eval_ids is not None else 0,
            "eval_tokens": int(texts.eval_ids.numel()) if texts.eval_ids is not None else 0,
        }

    report = build_report(
        metrics(stream.perplexity_before, original_params, original_mix, directory_size(inputs.model_dir)),
        metrics(stream.perplexity_after, params, mix, directory_size(model_out)),
        step_records,
        duration_s=round(time.perf_counter() - started, 3),
        evaluation_info=texts.evaluation_info(),
        notes=[LOW_MEMORY_NOTE, *texts.warnings],
    )
    write_report_files(report, out_dir)
    callbacks.progress(1.0, "done")
    return report
