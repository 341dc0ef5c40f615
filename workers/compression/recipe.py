"""The recipe vocabulary: each engine's configuration, torch-free (pydantic only).

A recipe is a list of steps discriminated on ``method``; each step model is the configuration of one
engine (``quantize`` → :mod:`workers.compression.quantize`, ``prune`` → :mod:`~workers.compression.prune`,
``distill`` → :mod:`~workers.compression.distill`), as torchao keeps a config beside its transform. The API's
``JobSpec`` (``app/jobs/spec.py``) composes these with where the inputs live; the local CLI reads a
:class:`Recipe` from a file. Nothing here imports torch, so the API validates a spec without it.

Rules that hold for every model here:

* unknown fields are an error, never silently dropped;
* floats are finite (``Infinity``/``NaN`` are refused when parsed) and every number has bounds;
* a default never depends on whether a key was sent: ``model_dump()`` re-validates to an equal model.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from workers.compression.gguf_types import FullPrecisionPolicy, GgufType, resolve_export_type
from workers.compression.matching import MAX_PATTERNS, ModuleMatcher, check_patterns

_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")

IGNORE_DESCRIPTION = (
    "modules left as they are. A plain name matches a module whose dotted name equals it or ends with "
    "'.' + it ('lm_head', 'down_proj' = every down_proj, 'model.layers.0.mlp.down_proj' = one); "
    "'re:' + a Python regex matches from the start of the full name ('re:.*layers\\.0\\..*'). "
    f"At most {MAX_PATTERNS} patterns of at most 256 characters."
)


class StrictModel(BaseModel):
    """Base for recipe models: unknown fields are an error, floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _check_ignore(value: list[str]) -> list[str]:
    check_patterns(value)
    return value


class CalibrationOptions(StrictModel):
    """How much calibration text to use: ``num_samples`` blocks of ``seq_len`` tokens."""

    num_samples: int = Field(default=128, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=16, le=8192)


class EvaluationOptions(StrictModel):
    """Perplexity is scored on non-overlapping windows of ``seq_len`` tokens, at most ``max_tokens`` in all."""

    seq_len: int = Field(default=512, ge=16, le=8192)
    max_tokens: int = Field(default=65536, ge=256, le=4_194_304)


# ---------------------------------------------------------------- quantize


class SmoothQuantOptions(StrictModel):
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="migration strength")


GROUP_SIZES = (128, 64, 32)


class QuantizeStep(StrictModel):
    """Quantize Linear layers. Weight-only int (`w8a16`, `w4a16`), int8 W8A8, or FP8."""

    method: Literal["quantize"] = "quantize"
    scheme: Literal["w8a16", "w4a16", "w8a8", "fp8"]
    algorithm: Literal["rtn", "gptq", "awq"] = "rtn"
    group_size: Literal[32, 64, 128, "auto"] | None = Field(
        default="auto",
        description="weight-only int: 32, 64 or 128 input columns share a scale; null = one scale per output "
        "channel. 'auto' (default): per channel for w8a16, and for w4a16 the largest of 128, 64, 32 that divides "
        "the input width of every quantized Linear (per channel if none does); the report names the choice.",
    )
    symmetric: bool = Field(default=True, description="false = asymmetric with a zero-point (weight-only int)")
    activations: Literal["dynamic", "static"] | None = Field(
        default=None, description="w8a8 only: per-token dynamic (null means dynamic) or per-tensor static scales"
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
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description=IGNORE_DESCRIPTION)

    _check_ignore = field_validator("ignore")(_check_ignore)

    @model_validator(mode="after")
    def _check_combination(self) -> QuantizeStep:
        weight_only = self.scheme in ("w8a16", "w4a16")
        if self.group_size not in (None, "auto") and not weight_only:
            raise ValueError(f"group_size applies to w8a16/w4a16 only, not {self.scheme}")
        if not self.symmetric and not weight_only:
            raise ValueError(f"asymmetric quantization applies to w8a16/w4a16 only, not {self.scheme}")
        if self.activations is not None and self.scheme != "w8a8":
            raise ValueError("activations applies to w8a8 only")
        if self.smoothquant is not None and self.scheme != "w8a8":
            raise ValueError("smoothquant applies to w8a8 only")
        if self.algorithm == "awq" and not weight_only:
            raise ValueError("awq applies to weight-only schemes (w8a16, w4a16)")
        if self.scheme == "fp8" and self.algorithm != "rtn":
            raise ValueError("fp8 supports algorithm 'rtn' only")
        return self

    @property
    def static_activations(self) -> bool:
        return self.activations == "static"

    @property
    def calibration_reason(self) -> str | None:
        """What in this step needs calibration text (``None``: nothing)."""
        if self.algorithm != "rtn":
            return f"algorithm {self.algorithm}"
        if self.smoothquant is not None:
            return "smoothquant"
        if self.static_activations:
            return "static activations"
        return None

    def with_group_size(self, in_features: list[int]) -> QuantizeStep:
        """This step with ``group_size: 'auto'`` resolved for Linears of these input widths (an explicit
        size is kept; :func:`group_size_problem` says whether it fits)."""
        if self.group_size != "auto":
            return self
        fits = [g for g in GROUP_SIZES if all(width % g == 0 for width in in_features)]
        return self.model_copy(update={"group_size": fits[0] if self.scheme == "w4a16" and fits else None})


def group_size_problem(group_size: int | str | None, in_features: list[int]) -> str | None:
    """Why ``group_size`` cannot quantize Linears of these input widths, with the sizes that can (``None``: it can)."""
    if not isinstance(group_size, int):
        return None
    bad = sorted({width for width in in_features if width % group_size})
    if not bad:
        return None
    fits = [g for g in GROUP_SIZES if all(width % g == 0 for width in in_features)]
    hint = f"use group_size {fits[0]}" if fits else "use group_size null (per channel)"
    return f"group_size {group_size} does not divide the input width {', '.join(map(str, bad))}: {hint} or 'auto'"


def llama_layout_widths(config: dict[str, Any], ignore: list[str]) -> list[int] | None:
    """Input widths of the Linears a quantize step with ``ignore`` would take in a Llama-layout model
    (q/k/v/o, gate/up/down, lm_head), read from its ``config.json``; ``None`` when the config does not
    say (the engine then checks on the loaded model). A cheap check at submission, before any work."""
    try:
        hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        heads, layers = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    ignored = ModuleMatcher(ignore)
    widths = {"lm_head": hidden}
    for index in range(min(layers, 512)):  # names by index, so 'ignore' of one layer counts as it will
        prefix = f"model.layers.{index}."
        widths |= {prefix + f"self_attn.{p}_proj": hidden for p in "qkv"}
        widths |= {prefix + "self_attn.o_proj": heads * head_dim, prefix + "mlp.down_proj": inter}
        widths |= {prefix + f"mlp.{p}_proj": hidden for p in ("gate", "up")}
    return [width for name, width in widths.items() if not ignored(name)]


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
        max_length=8,
        description="unstructured: N:M pattern, at most N non-zeros in every M consecutive weights (e.g. '2:4')",
    )
    targets: StructuredTargets | None = Field(default=None, description="structured only")
    dampening_frac: float = Field(default=0.01, gt=0.0, le=1.0, description="sparsegpt: Hessian dampening")
    block_size: int = Field(default=128, ge=1, le=4096, description="sparsegpt: columns per block")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="unstructured only: " + IGNORE_DESCRIPTION
    )

    _check_ignore = field_validator("ignore")(_check_ignore)

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
    def calibration_reason(self) -> str | None:
        return f"algorithm {self.algorithm}" if self.algorithm != "magnitude" else None


# ---------------------------------------------------------------- distill


class FromTeacher(StrictModel):
    """A student cut from the teacher by the structured-pruning machinery, initialised from its weights."""

    layers: list[Annotated[int, Field(ge=0, le=4095)]] | None = Field(
        default=None, max_length=4096, description="indices of teacher layers to keep"
    )
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


MAX_STUDENT_CONFIG_BYTES = 64 * 1024


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, key) for v in value)
    return False


class StudentSpec(StrictModel):
    """Exactly one way to make the student."""

    CHOICES: ClassVar[tuple[str, ...]] = ("from_teacher", "config", "previous_step")

    from_teacher: FromTeacher | None = None
    config: dict[str, Any] | None = Field(
        default=None, description="a transformers config dict (at most 64 KiB as JSON); fresh init"
    )
    previous_step: bool | None = Field(
        default=None, description="the model the preceding steps produced (e.g. after structured pruning)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentSpec:
        given = [k for k in self.CHOICES if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of " + ", ".join(f"'{k}'" for k in self.CHOICES))
        if self.config is not None:
            if len(json.dumps(self.config)) > MAX_STUDENT_CONFIG_BYTES:
                raise ValueError("student config is larger than 64 KiB")
            if _has_key(self.config, "auto_map") or _has_key(self.config, "trust_remote_code"):
                raise ValueError("student config must not use remote code ('auto_map')")
        return self


class HiddenStateMatch(StrictModel):
    layer_map: list[tuple[Annotated[int, Field(ge=0, le=4095)], Annotated[int, Field(ge=0, le=4095)]]] = Field(
        min_length=1, max_length=4096, description="[[student_layer, teacher_layer], ...]"
    )
    weight: float = Field(default=1.0, ge=0.0, le=1000.0)


class DistillStep(StrictModel):
    """Train a smaller student on the teacher's softened token distributions (+ optional CE and hidden states)."""

    method: Literal["distill"] = "distill"
    student: StudentSpec
    temperature: float = Field(default=2.0, gt=0.0, le=20.0)
    kl_weight: float = Field(default=1.0, ge=0.0, le=1000.0)
    ce_weight: float = Field(default=0.0, ge=0.0, le=1000.0)
    hidden_states: HiddenStateMatch | None = None
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    max_tokens: int | None = Field(default=None, ge=1, le=10**13)
    batch_size: int = Field(default=8, ge=1, le=1024)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    seq_len: int = Field(default=256, ge=16, le=8192)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0)
    warmup_steps: int = Field(default=0, ge=0, le=10_000_000)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e6)
    checkpoint_every: int = Field(default=100, ge=1, le=10_000_000)
    eval_every: int = Field(default=100, ge=1, le=10_000_000)
    eval_fraction: float = Field(default=0.05, gt=0.0, lt=0.5, description="held-out share of the training text")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _check(self) -> DistillStep:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give 'max_steps' or 'max_tokens'")
        if self.kl_weight == 0 and self.ce_weight == 0 and self.hidden_states is None:
            raise ValueError("every loss weight is zero: nothing to train")
        return self

    @property
    def calibration_reason(self) -> str | None:
        return None


# ---------------------------------------------------------------- export


class ExportStep(StrictModel):
    """Write the model as one GGUF file (``model.gguf``, beside ``model/``) that llama.cpp runs with nothing else.

    Last in a recipe. ``type: "auto"`` carries a preceding quantize step's integer codes and scales into GGUF
    blocks with no re-rounding (symmetric int4 → Q4_0, asymmetric int4 → Q4_1, symmetric int8 → Q8_0;
    :mod:`workers.compression.gguf_types`), or writes f16 without one; an explicit type re-quantizes with
    llama.cpp's quantizers where the codes cannot be carried.
    """

    method: Literal["export"] = "export"
    format: Literal["gguf"] = "gguf"
    type: GgufType = Field(
        default="auto",
        description="GGUF tensor type: auto = the quantize step's own codes (Q4_0 / Q4_1 / Q8_0), or f16 "
        "without one; or an explicit type to (re-)quantize to",
    )
    full_precision: FullPrecisionPolicy = Field(
        default="llama.cpp",
        description="type of the matrices the recipe left in full precision (embeddings, lm_head, ignored "
        "Linears): 'llama.cpp' = what llama-quantize gives them for this file type (output / tied embedding "
        "Q8_0, the rest the file's type), or 'q8_0' / 'f16' for all of them. Norms and biases are always F32.",
    )

    @property
    def calibration_reason(self) -> str | None:
        return None


AnyStep = QuantizeStep | PruneStep | DistillStep | ExportStep
Step = Annotated[AnyStep, Field(discriminator="method")]


def export_type(steps: list[Any], index: int) -> str:
    """The concrete GGUF type of the export step ``steps[index]``, given the quantize step before it;
    ``ValueError`` naming the fields when its codes cannot be stored as asked."""
    quantize = next((s for s in reversed(steps[:index]) if s.method == "quantize"), None)
    return resolve_export_type(steps[index].type, quantize.model_dump() if quantize is not None else None)


def check_export(steps: list[Any]) -> None:
    """An export step comes last, and its type fits the quantize step before it."""
    for index, step in enumerate(steps):
        if step.method != "export":
            continue
        if index != len(steps) - 1:
            raise ValueError(f"steps[{index}] (export) must be the last step")
        try:
            export_type(steps, index)
        except ValueError as exc:
            raise ValueError(f"steps[{index}] (export): {exc}") from exc


def check_steps_inputs(steps: list[Any], has_calibration: bool, has_training: bool) -> None:
    """``ValueError`` naming the first step whose calibration or training text is missing, or an export step
    out of place (:func:`check_export`)."""
    check_export(steps)
    for index, step in enumerate(steps):
        reason = step.calibration_reason
        if reason is not None and not has_calibration:
            raise ValueError(f"steps[{index}] ({step.method}, {reason}) needs 'calibration' text")
        if step.method == "distill" and not has_training:
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
    """What to do, without where the inputs live: the local CLI's ``--recipe`` file and what the pipeline
    runs. The texts come from files (CLI) or uploads (API); the options are the same."""

    steps: list[Step] = Field(min_length=1, max_length=16)
    calibration: CalibrationOptions | None = None
    evaluation: EvaluationOptions | None = None
    low_memory: bool | None = Field(default=None, description=LOW_MEMORY_DESCRIPTION)

    _check_low_memory = field_validator("low_memory")(check_low_memory)

    @model_validator(mode="after")
    def _export_last(self) -> Recipe:
        check_export(self.steps)
        return self

    @property
    def needs_calibration(self) -> bool:
        return any(step.calibration_reason is not None for step in self.steps)
