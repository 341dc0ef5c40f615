"""The job spec: the public contract of a compression job.

``JobSpec`` composes the engines' recipe vocabulary (:mod:`workers.compression.recipe`, torch-free) with
what only the service knows: where each input lives (a completed upload of this tenant or an allow-listed
``s3://`` URI), metadata, a one-off webhook and the hardware queue. The API validates a request against it
and stores :meth:`JobSpec.canonical` (every field, defaults included); the worker re-validates that stored
form into an equal spec and hands the engines the :class:`Recipe` of :meth:`JobSpec.recipe`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from workers.compression.recipe import (
    LOW_MEMORY_DESCRIPTION,
    AnyStep,
    CalibrationOptions,
    DistillStep,
    EvaluationOptions,
    ExportStep,
    PruneStep,
    QuantizeStep,
    Recipe,
    StrictModel,
    StudentSpec,
    check_low_memory,
    check_steps_inputs,
)


class Source(StrictModel):
    """Where an input lives: a completed upload of this tenant, or an allow-listed `s3://` URI."""

    upload_id: str | None = Field(default=None, max_length=64)
    uri: str | None = Field(
        default=None, max_length=1024, description="s3://bucket/prefix/ on an operator-allowed bucket"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if (self.upload_id is None) == (self.uri is None):
            raise ValueError("give exactly one of 'upload_id' or 'uri'")
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError("'uri' must be an s3://bucket/prefix URI")
        return self


class CalibrationInput(Source, CalibrationOptions):
    """Calibration text (txt, or jsonl with a `text` field) and how much of it to use."""


class EvaluationInput(Source, EvaluationOptions):
    """Held-out text for perplexity."""


class TrainingInput(Source):
    """Training text for distillation (txt, or jsonl with a `text` field)."""


class StudentSource(StudentSpec):
    """A distillation student: made by the engine (``from_teacher``, ``config``, ``previous_step``) or a model
    the tenant uploaded (``upload_id``) or keeps on an allowed bucket (``uri``)."""

    CHOICES: ClassVar[tuple[str, ...]] = ("from_teacher", "config", "upload_id", "uri", "previous_step")

    upload_id: str | None = Field(default=None, max_length=64)
    uri: str | None = Field(default=None, max_length=1024)

    def source(self) -> Source | None:
        """Where the student model lives, if it is one to fetch."""
        return Source(upload_id=self.upload_id, uri=self.uri) if (self.upload_id or self.uri) else None


class DistillJobStep(DistillStep):
    """``distill`` as a job takes it: the student may also be an upload or an ``s3://`` model."""

    student: StudentSource


JobStep = Annotated[QuantizeStep | PruneStep | DistillJobStep | ExportStep, Field(discriminator="method")]


class JobSpec(StrictModel):
    """A compression job: one input model, a pipeline of steps, and the texts they need."""

    model: Source
    steps: list[JobStep] = Field(min_length=1, max_length=16)
    calibration: CalibrationInput | None = None
    evaluation: EvaluationInput | None = None
    training: TrainingInput | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    webhook_url: str | None = Field(default=None, max_length=2048, description="one-off receiver for this job's events")
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

    def canonical(self) -> dict[str, Any]:
        """The one serialized form: stored with the job, hashed for idempotency, echoed by the API. Every
        field is written, defaults and nulls included, so re-validating it yields an equal spec."""
        return self.model_dump(mode="json")

    def recipe(self) -> Recipe:
        """The options part of this spec, as the pipeline consumes it."""
        return Recipe(
            steps=list[AnyStep](self.steps),  # the job steps are engine steps (DistillJobStep is a DistillStep)
            calibration=CalibrationOptions(**self.calibration.model_dump(include={"num_samples", "seq_len"}))
            if self.calibration
            else None,
            evaluation=EvaluationOptions(**self.evaluation.model_dump(include={"seq_len", "max_tokens"}))
            if self.evaluation
            else None,
            low_memory=self.low_memory,
        )
