"""The engine contract.

Every engine is a pure function over a torch model: ``engine(model, config, *, callbacks, ...)``
returning a :class:`StepOutcome`. No database, storage or Celery in here, so engines test in
milliseconds and serve the service, the local CLI and the benchmarks alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.compression import heap

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]
MetricsFn = Callable[[dict[str, Any]], None]


class StepCancelled(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside an engine when ``should_stop()`` turned true at a check point."""


class EngineError(Exception):
    """A problem with the model or config that the user can fix; the message is shown to them."""


def _no_progress(fraction: float, message: str) -> None:
    return None


def _never_stop() -> bool:
    return False


def _no_metrics(metrics: dict[str, Any]) -> None:
    return None


@dataclass
class Callbacks:
    """The hooks every engine receives: progress reporting and cooperative cancellation, plus an
    optional ``metrics`` sink for structured numbers (training step, losses) that become job events."""

    progress: ProgressFn = _no_progress
    should_stop: StopFn = _never_stop
    metrics: MetricsFn = _no_metrics

    def check(self) -> None:
        """Raise :class:`StepCancelled` if the job was asked to stop. Call between layers/steps."""
        if self.should_stop():
            raise StepCancelled("cancelled")

    def scaled(self, start: float, end: float) -> Callbacks:
        """Callbacks whose progress 0..1 maps onto ``start..end`` of this one (for sub-phases)."""
        parent = self.progress

        def progress(fraction: float, message: str) -> None:
            parent(start + (end - start) * min(max(fraction, 0.0), 1.0), message)

        return Callbacks(progress=progress, should_stop=self.should_stop, metrics=self.metrics)


@dataclass
class StepOutcome:
    """What an engine returns: the (possibly new) model and JSON-serialisable facts for the report."""

    model: nn.Module
    facts: dict[str, Any] = field(default_factory=dict)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Give ``module.weight`` new values by handing it ``value``'s storage (the caller gives ``value``
    up; a view of a larger tensor is copied first), leaving the old storage to be freed.

    A loaded checkpoint's tensors are private mappings of its safetensors file: writing into one
    copies every 4 KiB page on first touch (measured: 12 ms for a 1536 x 576 float32 weight, against
    under 1 ms for a fresh copy); the old pages are handed back instead (:func:`heap.release_pages`).
    The Parameter object stays, so hooks, qparams registered on the module and tied weights (one
    Parameter under two names) all see the new values.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        fresh = value.to(weight.dtype)
        if fresh.untyped_storage().nbytes() != fresh.nbytes or not fresh.is_contiguous():
            fresh = fresh.clone(memory_format=torch.contiguous_format)
        old = weight.data
        weight.data = fresh
        heap.release_pages(old)
