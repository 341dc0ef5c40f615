"""The engine contract.

Every engine is a pure function over a torch model: ``engine(model, config, *, callbacks, ...)``
returning a :class:`StepOutcome`. No database, storage or Celery in here, so engines test in
milliseconds and serve the service, the local CLI and the benchmarks alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

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
