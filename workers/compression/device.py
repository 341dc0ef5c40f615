"""Where the engines compute, and how much device memory a layer-by-layer run needs.

One code path serves every device: an engine receives a ``device`` (or computes where the model
lives) and creates each tensor beside the tensors it derives from, so the CPU tests run the very
code a CUDA worker runs. Only two things branch on the device type: the compiled numba loops serve
CPU tensors (:func:`workers.compression.weight_quant.use_compiled_kernels`; GPTQ's column loop and
the clip search run as torch ops elsewhere), and CUDA gets pinned host buffers, ``synchronize``
around timings and its own peak-memory counter.

**dtype policy.** Weights stay in the dtype the model holds them in, which is the checkpoint's own
dtype on a CUDA worker and float32 on the CPU (where bfloat16 matmuls are slow and float32 is
exact): no engine changes a weight's dtype (GPTQ, SparseGPT, AWQ and SmoothQuant each compute on a
float32 copy of the one matrix they solve and write the result back in the weight's dtype).
Statistics are float32 whatever the weights: Hessians ``XᵀX``, channel norms and absolute maxima,
output energies, and the Cholesky factors solved from them. Distillation keeps float32 master
weights and runs its forwards under bfloat16 autocast on CUDA.

**Layer-by-layer onload.** A model larger than the device stays in host memory;
:func:`workers.compression.layerwise.layerwise` moves one decoder layer at a time to the device,
calibrates it there and moves it back. :func:`layer_footprint` and :func:`peak_bytes` are the
accounting that decides, before the first layer, whether the calibration activations stay on the
device or are *spilled* to (pinned) host memory and brought over one batch at a time; the same
numbers go into the step's facts beside the measured CUDA peak.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# What ``hardware`` (a job's spec, a worker's queue) asks of the worker's device.
HARDWARE = ("auto", "cpu", "gpu")
# Share of the device memory an onloaded run plans to use: the caching allocator rounds blocks
# up and fragments, and kernels take workspaces (cuBLAS, SDPA) the accounting does not list.
BUDGET_SHARE = 0.9


class DeviceUnavailableError(RuntimeError):
    """The hardware asked for is not in this process (``hardware: gpu`` without CUDA)."""


def resolve_device(hardware: str | None = "auto") -> torch.device:
    """The device for a job's ``hardware``: ``gpu`` needs CUDA (:class:`DeviceUnavailableError` without),
    ``cpu`` is the CPU even where CUDA exists, ``auto`` (or ``None``) CUDA when there is one."""
    choice = hardware or "auto"
    if choice not in HARDWARE:
        raise ValueError(f"hardware must be one of {', '.join(HARDWARE)}, got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "gpu":
        raise DeviceUnavailableError(cuda_problem() or "CUDA is not available")
    return torch.device("cpu")


def load_dtype(device: torch.device) -> torch.dtype | str:
    """The dtype to load a model in for ``device`` (the dtype policy above): the checkpoint's own on CUDA
    (transformers' ``"auto"``), float32 on the CPU."""
    return "auto" if device.type == "cuda" else torch.float32


# Whole-model placement leaves this share of the budget for a layer's activations, statistics and solves.
WHOLE_MODEL_SHARE = 0.6


def fits_on(model: nn.Module, device: torch.device, budget: int | None = None) -> bool:
    """Whether ``model`` should live on ``device`` whole (its bytes within :data:`WHOLE_MODEL_SHARE` of the
    ``budget``, by default :func:`device_budget`) rather than visit it one layer at a time. Always on the
    CPU, which is where a model is loaded."""
    budget = budget if budget is not None else device_budget(device)
    return budget is None or module_bytes(model) <= WHOLE_MODEL_SHARE * budget


def cuda_problem() -> str | None:
    """Why this process cannot use CUDA, in words an operator can act on (``None``: it can)."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: check the NVIDIA driver "
        "and the device reservation (CUDA_VISIBLE_DEVICES, the container's GPU request)"
    )


def cuda_environment() -> dict[str, Any] | None:
    """The GPUs this process sees, for a report's environment (``None`` without CUDA)."""
    if not torch.cuda.is_available():
        return None
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_bytes": int(props.total_memory)})
    return {"cuda": torch.version.cuda, "gpus": gpus}


def device_budget(device: torch.device, share: float = BUDGET_SHARE) -> int | None:
    """Bytes an onloaded run may still allocate on ``device``: ``None`` (no limit worth planning for)
    on the CPU; on CUDA the free memory (the driver's, plus what torch's allocator holds unused),
    capped by ``torch.cuda.set_per_process_memory_fraction`` when one was set, times ``share``."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    available = free + torch.cuda.memory_reserved(index) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if callable(get_fraction):
        available = min(available, int(get_fraction(index) * total) - allocated)
    return max(0, int(available * share))


# ---------------------------------------------------------------- accounting


@dataclass(frozen=True)
class LayerFootprint:
    """Device bytes of one decoder layer's calibration, by part (see :func:`layer_footprint`)."""

    weights: int
    """The layer's parameters and buffers (quantization parameters included) when they come to the device
    for the layer's turn; 0 when the whole model lives there."""
    activations: int
    """Every calibration batch's hidden states at the layer's input."""
    batch: int
    """The largest single batch's hidden states (what a spilled run holds of them at a time)."""
    arguments: int
    """The other tensors the layers receive (rotary embeddings, masks), counted once: they stay on
    the device whether or not the hidden states are spilled."""
    statistics: int
    """float32 input statistics held at once: every distinct input's ``XᵀX`` when the layer is observed
    whole, the largest one when it is calibrated group by group."""
    solver: int
    """The largest solve's working set (GPTQ, SparseGPT, the AWQ search): ``H`` and its factors, float32
    copies of the stacked weight."""
    forward: int
    """One batch's transient forward: the MLP's intermediate activations and the attention's q/k/v/o."""


def peak_bytes(footprint: LayerFootprint, *, spill: bool) -> int:
    """Expected peak device bytes of calibrating one layer: its weights, the statistics and the solver,
    the layer arguments, one batch's forward, and the hidden states: all batches' inputs and outputs
    (both are alive while a layer runs over the batches) or, spilled, one batch's input and output."""
    resident = 2 * (footprint.batch if spill else footprint.activations)
    return (
        footprint.weights + resident + footprint.arguments + footprint.statistics + footprint.solver + footprint.forward
    )


@dataclass(frozen=True)
class OnloadPlan:
    """What a layer-by-layer run decided before the first layer, and why (a step's ``device_memory`` fact)."""

    device: str
    onload: bool
    """Layers live in host memory and visit the device one at a time."""
    spill: bool
    """The hidden states wait in host memory and visit the device one batch at a time."""
    budget_bytes: int | None
    expected_peak_bytes: int
    footprint: LayerFootprint
    measured_peak_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` over the layer loop (CUDA only), beside the expectation."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_onload(footprint: LayerFootprint, budget: int | None, *, device: torch.device, onload: bool) -> OnloadPlan:
    """Keep the hidden states on the device when :func:`peak_bytes` fits ``budget`` (``None``: no
    limit), else spill them; the plan carries the peak expected for the choice made. A budget that
    even a spilled run exceeds is not refused here: the run is tried and the device says."""
    resident = peak_bytes(footprint, spill=False)
    spill = budget is not None and resident > budget
    expected = peak_bytes(footprint, spill=True) if spill else resident
    return OnloadPlan(str(device), onload, spill, budget, expected, footprint)


def tensor_bytes(values: Iterable[Any]) -> int:
    """Bytes of the tensors among ``values`` (also inside tuples, lists and dicts), each storage once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _tensors(values):
        key = (str(tensor.device), id(tensor) if tensor.device.type == "meta" else tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on ``meta`` modules: shapes only)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def layer_footprint(
    layer: nn.Module,
    hidden: Sequence[torch.Tensor],
    arguments: Sequence[Any] = (),
    *,
    input_groups: Sequence[tuple[int, int]] | None = None,
    whole_layer_statistics: bool = True,
    solves: bool = True,
    onload: bool = True,
) -> LayerFootprint:
    """The accounting of one decoder layer over calibration batches whose hidden states are ``hidden``
    and whose other layer arguments are ``arguments`` (anything holding tensors).

    ``input_groups`` are ``(width, rows)`` of every distinct tensor the layer's Linears read (q/k/v read
    one, ``rows`` being their output rows together); the caller knows the layer's shape. Without, every
    Linear reads its own (an upper bound). ``whole_layer_statistics`` counts one float32 ``XᵀX`` per
    input (a layer observed whole), ``False`` only the widest (group-by-group calibration frees each
    group's before the next). ``solves`` adds the largest GPTQ/SparseGPT working set of one group.
    ``onload``: the layer's weights come to the device for its turn (otherwise they are there already,
    with the rest of the model, and the budget has counted them).
    """
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    groups = list(input_groups) if input_groups is not None else [(m.in_features, m.out_features) for m in linears]
    f32 = 4
    widths = [width for width, _ in groups]
    statistics = f32 * (sum(d * d for d in widths) if whole_layer_statistics else max(widths, default=0) ** 2)
    # d x d: H (2/n XᵀX), its damped scratch copy, the Cholesky factor flipped and unflipped, the inverse;
    # rows x d in float32: the stacked weight, Wᵀ, Q, Q back in W's layout, the clip search's buffers, the
    # new weights and the error measures.
    solver = f32 * max((5 * d * d + 8 * rows * d for d, rows in groups), default=0) if solves else 0
    tokens = max((h.numel() // h.shape[-1] for h in hidden), default=0)
    act_size = max((h.element_size() for h in hidden), default=f32)
    widest_out = max((m.out_features for m in linears), default=0)
    hidden_width = max((h.shape[-1] for h in hidden), default=0)
    # One batch through the layer: the widest Linear's output (MLP gate and up, and their product) and
    # the attention's q, k, v and output, at the hidden states' precision.
    forward = act_size * tokens * (3 * widest_out + 4 * hidden_width)
    return LayerFootprint(
        weights=module_bytes(layer) if onload else 0,
        activations=sum(h.numel() * h.element_size() for h in hidden),
        batch=max((h.numel() * h.element_size() for h in hidden), default=0),
        arguments=tensor_bytes(arguments),
        statistics=statistics,
        solver=solver,
        forward=forward,
    )


# ---------------------------------------------------------------- measuring


@dataclass
class PeakMemory:
    """A CUDA peak over a block (both stay ``None`` on other devices)."""

    device: torch.device | None
    bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` over the block (its counter reset at the start)."""
    added: int | None = None
    """The peak less what was allocated when the block began: what the block itself needed."""


@contextmanager
def cuda_peak(device: torch.device | None) -> Iterator[PeakMemory]:
    """Measure the CUDA peak over the block; nothing on other devices (or none)."""
    peak = PeakMemory(device)
    if device is None or device.type != "cuda":
        yield peak
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        yield peak
    finally:
        torch.cuda.synchronize(device)
        peak.bytes = int(torch.cuda.max_memory_allocated(device))
        peak.added = peak.bytes - before


def host_buffer(like: torch.Tensor, compute: torch.device) -> torch.Tensor:
    """An empty host tensor shaped like ``like`` to spill it into: page-locked when ``compute`` is a
    CUDA device (copies to and from it run at full bus speed), ordinary memory otherwise."""
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=compute.type == "cuda")
