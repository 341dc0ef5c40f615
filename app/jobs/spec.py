"""The job spec: the public contract of a compression job, shared by the API and the workers.

A job is a pipeline of `steps`, each a discriminated union on `method`. The API validates a
request body against `JobSpec`; workers re-read the stored spec with the same model, and the
engines take the step models as their configuration. Pure pydantic: no torch here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class StrictModel(BaseModel):
    """Base for spec models: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Source(StrictModel):
    """Where an input lives: a completed upload of this tenant, or an allow-listed `s3://` URI."""

    upload_id: str | None = None
    uri: str | None = Field(default=None, description="s3://bucket/prefix/ on an operator-allowed bucket")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if (self.upload_id is None) == (self.uri is None):
            raise ValueError("give exactly one of 'upload_id' or 'uri'")
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError("'uri' must be an s3://bucket/prefix URI")
        return self


class CalibrationOptions(StrictModel):
    """How much calibration text to use: ``num_samples`` blocks of ``seq_len`` tokens."""

    num_samples: int = Field(default=128, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=16, le=8192)


class EvaluationOptions(StrictModel):
    """Perplexity is scored on non-overlapping windows of ``seq_len`` tokens, at most ``max_tokens`` in all."""

    seq_len: int = Field(default=512, ge=16, le=8192)
    max_tokens: int = Field(default=65536, ge=256, le=4_194_304)


class CalibrationInput(Source, CalibrationOptions):
    """Calibration text (txt, or jsonl with a `text` field) and how much of it to use."""


class EvaluationInput(Source, EvaluationOptions):
    """Held-out text for perplexity."""


class TrainingInput(Source):
    """Training text for distillation (txt, or jsonl with a `text` field)."""


# ---------------------------------------------------------------- quantize


class SmoothQuantOptions(StrictModel):
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="migration strength")


class QuantizeStep(StrictModel):
    """Quantize Linear layers. Weight-only int (`w8a16`, `w4a16`), int8 W8A8, or FP8."""

    method: Literal["quantize"] = "quantize"
    scheme: Literal["w8a16", "w4a16", "w8a8", "fp8"]
    algorithm: Literal["rtn", "gptq", "awq"] = "rtn"
    group_size: int | None = Field(
        default=None,
        description="32, 64 or 128 for grouped weight-only int; null = per output channel. "
        "Defaults to 128 for w4a16 and per-channel otherwise.",
    )
    symmetric: bool = Field(default=True, description="false = asymmetric with a zero-point (weight-only int)")
    activations: Literal["dynamic", "static"] | None = Field(
        default=None, description="w8a8 only: per-token dynamic (default) or per-tensor static scales"
    )
    smoothquant: SmoothQuantOptions | None = Field(default=None, description="w8a8 only: SmoothQuant pre-pass")
    dampening_frac: float = Field(default=0.01, gt=0.0, le=1.0, description="gptq: Hessian dampening")
    act_order: bool = Field(
        default=True,
        description="gptq: quantize columns by descending activation, group scales fixed up front from the "
        "original weight (static groups: no g_idx, no runtime cost; llm-compressor's default too)",
    )
    block_size: int = Field(default=128, ge=1, le=4096, description="gptq: columns per lazy update block")
    clip_search: bool = Field(
        default=True,
        description="gptq: scales fixed up front (per channel, or static groups with act_order) come from an "
        "activation-weighted search over shrunk ranges instead of plain min/max (false: llm-compressor's min/max)",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="module names or `re:` regexes left in full precision",
    )

    @model_validator(mode="after")
    def _check_combination(self) -> QuantizeStep:
        weight_only = self.scheme in ("w8a16", "w4a16")
        if self.group_size is not None:
            if not weight_only:
                raise ValueError(f"group_size applies to w8a16/w4a16 only, not {self.scheme}")
            if self.group_size not in (32, 64, 128):
                raise ValueError("group_size must be 32, 64, 128 or null (per channel)")
        elif self.scheme == "w4a16" and "group_size" not in self.model_fields_set:
            self.group_size = 128
        if not self.symmetric and not weight_only:
            raise ValueError(f"asymmetric quantization applies to w8a16/w4a16 only, not {self.scheme}")
        if self.activations is not None and self.scheme != "w8a8":
            raise ValueError("activations applies to w8a8 only")
        if self.scheme == "w8a8" and self.activations is None:
            self.activations = "dynamic"
        if self.smoothquant is not None and self.scheme != "w8a8":
            raise ValueError("smoothquant applies to w8a8 only")
        if self.algorithm == "awq" and not weight_only:
            raise ValueError("awq applies to weight-only schemes (w8a16, w4a16)")
        if self.scheme == "fp8" and self.algorithm != "rtn":
            raise ValueError("fp8 supports algorithm 'rtn' only")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm != "rtn" or self.smoothquant is not None or self.activations == "static"


# ---------------------------------------------------------------- prune


class StructuredTargets(StrictModel):
    """Fractions to remove, uniformly across layers so the result is an ordinary dense config."""

    layers: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of decoder layers to drop")
    heads: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="fraction of attention heads to drop: whole GQA groups, or the same number of query heads "
        "from every group, whichever is nearer",
    )
    mlp: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of MLP intermediate channels to drop")

    @model_validator(mode="after")
    def _at_least_one(self) -> StructuredTargets:
        if self.layers is None and self.heads is None and self.mlp is None:
            raise ValueError("name at least one of 'layers', 'heads', 'mlp'")
        return self


class PruneStep(StrictModel):
    """Unstructured (magnitude, Wanda, SparseGPT; a ratio or an N:M pattern) or structured pruning."""

    method: Literal["prune"] = "prune"
    algorithm: Literal["magnitude", "wanda", "sparsegpt", "structured"]
    sparsity: float | None = Field(
        default=None, ge=0.0, le=0.95, description="unstructured: fraction of zeros per layer"
    )
    pattern: str | None = Field(
        default=None,
        description="unstructured: N:M pattern, at most N non-zeros in every M consecutive weights (e.g. '2:4')",
    )
    targets: StructuredTargets | None = Field(default=None, description="structured only")
    dampening_frac: float = Field(default=0.01, gt=0.0, le=1.0, description="sparsegpt: Hessian dampening")
    block_size: int = Field(default=128, ge=1, le=4096, description="sparsegpt: columns per block")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = _NM_PATTERN.match(value)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)) <= 64:
            raise ValueError("pattern must be 'N:M' with 0 < N < M <= 64, e.g. '2:4'")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> PruneStep:
        if self.algorithm == "structured":
            if self.targets is None:
                raise ValueError("structured pruning needs 'targets'")
            if self.sparsity is not None or self.pattern is not None:
                raise ValueError("'sparsity' and 'pattern' apply to unstructured pruning only")
        else:
            if self.targets is not None:
                raise ValueError("'targets' applies to structured pruning only")
            if (self.sparsity is None) == (self.pattern is None):
                raise ValueError("give exactly one of 'sparsity' or 'pattern'")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """The (N, M) of `pattern`: at most N non-zero weights in every M consecutive inputs (2:4 = 50 %)."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in ("wanda", "sparsegpt") or (self.algorithm == "structured" and self.targets is not None)


# ---------------------------------------------------------------- distill


class FromTeacher(StrictModel):
    """A student cut from the teacher by the structured-pruning machinery, initialised from its weights."""

    layers: list[int] | None = Field(default=None, description="indices of teacher layers to keep")
    keep_ratio: float | None = Field(default=None, gt=0.0, le=1.0, description="fraction of layers to keep")
    heads: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of heads to drop")
    mlp: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of MLP channels to drop")

    @model_validator(mode="after")
    def _one_layer_rule(self) -> FromTeacher:
        if self.layers is not None and self.keep_ratio is not None:
            raise ValueError("give 'layers' or 'keep_ratio', not both")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("'layers' must be a non-empty list of distinct indices")
        return self


class StudentSpec(StrictModel):
    """Exactly one way to make the student."""

    from_teacher: FromTeacher | None = None
    config: dict[str, Any] | None = Field(default=None, description="a transformers config dict; fresh init")
    upload_id: str | None = None
    uri: str | None = None
    previous_step: bool | None = Field(
        default=None, description="the model the preceding steps produced (e.g. after structured pruning)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentSpec:
        given = [k for k in ("from_teacher", "config", "upload_id", "uri", "previous_step") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'from_teacher', 'config', 'upload_id', 'uri', 'previous_step'")
        if self.config is not None and ("auto_map" in self.config or "trust_remote_code" in self.config):
            raise ValueError("student config must not use remote code ('auto_map')")
        return self


class HiddenStateMatch(StrictModel):
    layer_map: list[tuple[int, int]] = Field(min_length=1, description="[[student_layer, teacher_layer], ...]")
    weight: float = Field(default=1.0, ge=0.0)


class DistillStep(StrictModel):
    """Train a smaller student on the teacher's softened token distributions (+ optional CE and hidden states)."""

    method: Literal["distill"] = "distill"
    student: StudentSpec
    temperature: float = Field(default=2.0, gt=0.0, le=20.0)
    kl_weight: float = Field(default=1.0, ge=0.0)
    ce_weight: float = Field(default=0.0, ge=0.0)
    hidden_states: HiddenStateMatch | None = None
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    max_tokens: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1, le=1024)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    seq_len: int = Field(default=256, ge=16, le=8192)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    checkpoint_every: int = Field(default=100, ge=1)
    eval_every: int = Field(default=100, ge=1)
    eval_fraction: float = Field(default=0.05, gt=0.0, lt=0.5, description="held-out share of the training text")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DistillStep:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give 'max_steps' or 'max_tokens'")
        if self.kl_weight == 0 and self.ce_weight == 0 and self.hidden_states is None:
            raise ValueError("every loss weight is zero: nothing to train")
        return self

    @property
    def needs_calibration(self) -> bool:
        return False


Step = Annotated[QuantizeStep | PruneStep | DistillStep, Field(discriminator="method")]


def check_steps_inputs(steps: list[Any], has_calibration: bool, has_training: bool) -> None:
    for index, step in enumerate(steps):
        if step.needs_calibration and not has_calibration:
            raise ValueError(f"steps[{index}] ({step.method} {getattr(step, 'algorithm', '')}) needs 'calibration'")
        if isinstance(step, DistillStep) and not has_training:
            raise ValueError(f"steps[{index}] (distill) needs 'training' text")


LOW_MEMORY_DESCRIPTION = (
    "quantize one decoder layer at a time straight from the safetensors shards, so the model is never "
    "whole in memory (speed and the text sample are then not measured). null (default): automatic, "
    "when the model would not fit in the worker's memory; true: always; false: never. Only for a "
    "recipe of one quantize step."
)


def check_low_memory(value: bool | None, info: ValidationInfo) -> bool | None:
    """``low_memory: true`` needs a recipe of exactly one quantize step (the layer-streaming engine)."""
    steps = info.data.get("steps") or []
    if value and not (len(steps) == 1 and steps[0].method == "quantize"):
        raise ValueError("low_memory mode runs a recipe of exactly one quantize step")
    return value


class Recipe(StrictModel):
    """What to do, without where the inputs live: the local CLI's ``--recipe`` file.

    The texts come from command-line files instead of uploads; the options are the same as the API's.
    """

    steps: list[Step] = Field(min_length=1, max_length=16)
    calibration: CalibrationOptions | None = None
    evaluation: EvaluationOptions | None = None
    low_memory: bool | None = Field(default=None, description=LOW_MEMORY_DESCRIPTION)

    _check_low_memory = field_validator("low_memory")(check_low_memory)


class JobSpec(StrictModel):
    """A compression job: one input model, a pipeline of steps, and the texts they need."""

    model: Source
    steps: list[Step] = Field(min_length=1, max_length=16)
    calibration: CalibrationInput | None = None
    evaluation: EvaluationInput | None = None
    training: TrainingInput | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    webhook_url: str | None = Field(default=None, description="one-off receiver for this job's events")
    hardware: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="worker queue: 'auto' uses GPU workers where the operator runs them"
    )
    low_memory: bool | None = Field(default=None, description=LOW_MEMORY_DESCRIPTION)

    _check_low_memory = field_validator("low_memory")(check_low_memory)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 16:
            raise ValueError("at most 16 metadata keys")
        for key, item in value.items():
            if not key or len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are 1-64 characters and values at most 512")
        return value

    @model_validator(mode="after")
    def _inputs_present(self) -> JobSpec:
        check_steps_inputs(self.steps, self.calibration is not None, self.training is not None)
        return self

    def recipe(self) -> Recipe:
        """The options part of this spec, as the pipeline consumes it."""
        return Recipe(
            steps=self.steps,
            calibration=CalibrationOptions(**self.calibration.model_dump(include={"num_samples", "seq_len"}))
            if self.calibration
            else None,
            evaluation=EvaluationOptions(**self.evaluation.model_dump(include={"seq_len", "max_tokens"}))
            if self.evaluation
            else None,
            low_memory=self.low_memory,
        )
