"""Device policy and the onload accounting, on the CPU: the same functions a CUDA worker runs.

Where a test needs CUDA it says so and is skipped here (``pytest -ra`` counts them); those run in
``bench/gpu_check.sh`` on a GPU machine (tests/workers/test_device_cuda.py).
"""

from __future__ import annotations

import copy
import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import gptq_pipeline_report
from tests.tiny import sample_text, tiny_model, write_model_dir
from workers.compression.base import EngineError
from workers.compression.device import (
    DeviceUnavailableError,
    LayerFootprint,
    fits_on,
    layer_footprint,
    module_bytes,
    peak_bytes,
    plan_onload,
    resolve_device,
)
from workers.compression.layerwise import LayerBatch, decoder_layers, layerwise, linear_input_groups
from workers.compression.prune import prune
from workers.compression.quantize import quantize
from workers.compression.recipe import PruneStep, QuantizeStep, Recipe
from workers.compression.weight_quant import without_compiled_kernels

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (10, 24), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------- which device


def test_hardware_names_a_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="hardware must be one of auto, cpu, gpu"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the behaviour without CUDA; this machine has CUDA")
def test_without_cuda_auto_is_the_cpu_and_gpu_is_refused() -> None:
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        resolve_device("gpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the behaviour without CUDA; this machine has CUDA")
@pytest.mark.parametrize("queues", ["gpu", "cpu,gpu"])
def test_a_gpu_worker_refuses_to_start_without_cuda(queues: str) -> None:
    # In a child process: were the check missing, the worker would start (and this test time out).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--queues", queues],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "the gpu queue needs CUDA" in done.stderr and "--queues cpu" in done.stderr


@pytest.mark.skipif(not NO_CUDA, reason="checks the behaviour without CUDA; this machine has CUDA")
def test_a_gpu_job_on_a_worker_without_cuda_fails_with_a_reason(tmp_path: Path) -> None:
    from workers.pipeline import PipelineInputs, run_pipeline

    write_model_dir(tmp_path / "model")
    recipe = Recipe.model_validate({"steps": [{"method": "quantize", "scheme": "w8a16"}]})
    inputs = PipelineInputs(model_dir=tmp_path / "model", measure_speed=False, hardware="gpu")
    with pytest.raises(EngineError, match="asks for a GPU, but this worker has none"):
        run_pipeline(recipe, inputs, tmp_path / "out")


def test_a_cpu_job_reports_where_its_layers_ran(tmp_path: Path) -> None:
    report = gptq_pipeline_report(tmp_path, hardware="cpu", measure_speed=False)
    step = report["steps"][0]
    memory = step["details"]["device_memory"]
    assert memory["device"] == "cpu" and memory["onload"] is False and memory["spill"] is False
    assert memory["expected_peak_bytes"] == peak_bytes(LayerFootprint(**memory["footprint"]), spill=False)
    # CUDA's numbers only where there is CUDA.
    assert "peak_device_memory_bytes" not in step and "gpus" not in report["environment"]


# ---------------------------------------------------------------- the accounting


def _batches(model: nn.Module, sizes: list[int], seq: int = 16) -> list[torch.Tensor]:
    width = model.config.hidden_size
    return [torch.zeros(n, seq, width) for n in sizes]


def test_the_footprint_of_a_layer_is_counted_by_hand() -> None:
    """Tiny Llama layer: hidden 64, MLP 128, 4 heads x 16 (2 KV heads), float32, two batches of 4 and 2 x 16 tokens."""
    model = tiny_model()
    layer = decoder_layers(model)[0]
    hidden = _batches(model, [4, 2])
    args = [{"position_embeddings": (torch.zeros(4, 16, 16), torch.zeros(4, 16, 16))}]
    footprint = layer_footprint(layer, hidden, args, input_groups=linear_input_groups(layer))

    weights = 4 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 128 * 64 + 128 * 64 + 64 * 128 + 64 + 64)
    assert footprint == LayerFootprint(
        weights=weights,
        activations=4 * (4 + 2) * 16 * 64,
        batch=4 * 4 * 16 * 64,
        arguments=4 * 2 * 4 * 16 * 16,
        # Four inputs (q/k/v, o, gate/up, down), 64, 64, 64 and 128 wide, observed at once.
        statistics=4 * (3 * 64 * 64 + 128 * 128),
        # The largest solve: gate/up's 256 rows x 64 columns (5 x 64² + 8 x 256 x 64 > down_proj's
        # 64 rows x 128 columns, 5 x 128² + 8 x 64 x 128).
        solver=4 * (5 * 64 * 64 + 8 * 256 * 64),
        # 64 tokens through gate/up (128 wide, three of them) and the attention's four 64-wide tensors.
        forward=4 * 64 * (3 * 128 + 4 * 64),
    )
    resident = weights + 2 * footprint.activations + footprint.arguments
    resident += footprint.statistics + footprint.solver + footprint.forward
    assert peak_bytes(footprint, spill=False) == resident
    assert peak_bytes(footprint, spill=True) == resident - 2 * footprint.activations + 2 * footprint.batch

    # Group by group only one Hessian is alive; a model already on the device brings no weights.
    staged = layer_footprint(
        layer, hidden, args, input_groups=linear_input_groups(layer), whole_layer_statistics=False, onload=False
    )
    assert staged.statistics == 4 * 128 * 128 and staged.weights == 0


def test_the_footprint_needs_shapes_only() -> None:
    """A meta skeleton (a model too large to load) is accounted exactly as the loaded model."""
    loaded = decoder_layers(tiny_model())[0]
    with torch.device("meta"):
        skeleton = decoder_layers(tiny_model())[0]
    hidden = _batches(tiny_model(), [3])
    meta_hidden = [h.to("meta") for h in hidden]
    assert layer_footprint(skeleton, meta_hidden) == layer_footprint(loaded, hidden)
    assert module_bytes(skeleton) == module_bytes(loaded) > 0


def test_the_spill_decision_follows_the_accounting() -> None:
    footprint = LayerFootprint(
        weights=100, activations=1000, batch=250, arguments=10, statistics=40, solver=30, forward=20
    )
    resident, spilled = peak_bytes(footprint, spill=False), peak_bytes(footprint, spill=True)
    assert (resident, spilled) == (2200, 700)
    cpu = torch.device("cpu")
    for budget, spill in ((None, False), (resident, False), (resident - 1, True), (spilled, True), (1, True)):
        plan = plan_onload(footprint, budget, device=cpu, onload=True)
        assert plan.spill is spill, budget
        assert plan.expected_peak_bytes == (spilled if spill else resident)


def test_a_model_lives_on_the_device_whole_when_it_fits_with_room_for_a_layer() -> None:
    model = tiny_model()
    size = module_bytes(model)
    assert fits_on(model, torch.device("cpu"))  # no budget on the CPU
    assert fits_on(model, torch.device("cpu"), budget=2 * size)
    assert not fits_on(model, torch.device("cpu"), budget=size)


# ---------------------------------------------------------------- the accounting against a measurement


class _HostPeak(TorchDispatchMode):
    """The most bytes glibc's allocator had handed out after any torch op in the block (``mallinfo2``:
    heap blocks in use plus mmapped ones), less what it had at the start: the CPU's own
    ``max_memory_allocated``, for a run whose device is the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.start = self.peak = _in_use()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _in_use())
        return out

    @property
    def added(self) -> int:
        return self.peak - self.start


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def _in_use() -> int:
    info = _libc().mallinfo2()
    return int(info.uordblks + info.hblkhd)


@pytest.mark.slow  # every torch op goes through a dispatch mode and a mallinfo2 call: 5-60 s per engine
@pytest.mark.skipif(_libc() is None, reason="measures with glibc's mallinfo2; this C library is not glibc")
@pytest.mark.parametrize("engine", ["gptq", "awq", "sparsegpt"])
def test_the_expected_peak_bounds_what_a_cpu_run_allocates(engine: str) -> None:
    """The accounting against a measurement: on the CPU the allocator's counters play
    ``torch.cuda.max_memory_allocated``. The expected peak must cover the run's, and not by a factor that
    would make the spill decision meaningless. (Measured at 0.63-0.88 of expected over GPTQ, AWQ and
    SparseGPT at widths 128-512, MLP 512-2048; bench/gpu_check.sh checks the same on CUDA.)"""
    torch.manual_seed(0)
    model = tiny_model(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4)
    ids = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    # One thread: mallinfo2 counts the main arena only, and allocations made on torch's intra-op threads land in
    # theirs (after earlier tests had started them, the same run measured a quarter of its real peak).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with without_compiled_kernels(), _HostPeak() as measured:  # the torch loops: the GPU's code
            facts = ENGINES[engine](model, ids, device="cpu").facts
    finally:
        torch.set_num_threads(threads)
    expected = facts["device_memory"]["expected_peak_bytes"]
    assert 0.5 * expected <= measured.added <= expected, (measured.added, expected)


# ---------------------------------------------------------------- spilling changes nothing


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


ENGINES: dict[str, Callable[..., Any]] = {
    # Group by group (staged_forward); with spilling its o/down inputs are recomputed, not kept.
    "gptq": lambda m, ids, **kw: quantize(
        m, QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32), calibration=ids, **kw
    ),
    # The whole layer observed, then run again (AWQ balances Linears against each other first).
    "awq": lambda m, ids, **kw: quantize(
        m, QuantizeStep(scheme="w4a16", algorithm="awq", group_size=32), calibration=ids, **kw
    ),
    "sparsegpt": lambda m, ids, **kw: prune(m, PruneStep(algorithm="sparsegpt", sparsity=0.5), calibration=ids, **kw),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_spilled_activations_give_the_same_model_bit_for_bit(engine: str, calibration: torch.Tensor) -> None:
    run = ENGINES[engine]
    resident_model, spilled_model = tiny_model(), tiny_model()
    resident = run(resident_model, calibration, device="cpu").facts["device_memory"]
    assert resident["spill"] is False and resident["budget_bytes"] is None  # the CPU sets no budget
    # One byte short of what keeping the activations would need: the plan spills them.
    spilled = run(spilled_model, calibration, device="cpu", budget=resident["expected_peak_bytes"] - 1)
    memory = spilled.facts["device_memory"]
    assert memory["spill"] is True
    assert memory["expected_peak_bytes"] == peak_bytes(LayerFootprint(**memory["footprint"]), spill=True)
    assert memory["expected_peak_bytes"] < resident["expected_peak_bytes"]
    assert memory["measured_peak_bytes"] is None  # measured on CUDA only
    _assert_identical(_state(resident_model), _state(spilled_model))


def test_a_spilled_batch_keeps_its_own_host_copy() -> None:
    hidden, kwargs = torch.randn(2, 8, 64), {"position_embeddings": (torch.randn(2, 8, 16),)}
    batch = LayerBatch(hidden, kwargs, [kwargs, kwargs])
    batch.to(torch.device("cpu"), spill=True)
    assert batch.spilled
    stored = batch._hidden
    assert stored.data_ptr() != hidden.data_ptr() and torch.equal(batch.hidden, hidden)
    new = torch.randn(2, 8, 64)
    batch.hidden = new  # a layer's output goes back to host memory as a copy
    assert batch._hidden.data_ptr() != new.data_ptr() and torch.equal(batch.hidden, new)
    # The layer arguments of every layer are the same tensors: moved once, shared.
    assert batch.layer_kwargs[0]["position_embeddings"][0] is batch.layer_kwargs[1]["position_embeddings"][0]


def test_the_layer_loop_spills_when_its_budget_says_so(calibration: torch.Tensor) -> None:
    seen: list[bool] = []

    def process(_index: int, _prefix: str, _layer: nn.Module, replay: Callable[[], list[torch.Tensor]]) -> None:
        replay()

    run = layerwise(tiny_model(), calibration, process, inspect=lambda _l, b: seen.append(b.spilled), budget=1)
    assert run.memory.spill and seen == [True]
    run = layerwise(tiny_model(), calibration, process, inspect=lambda _l, b: seen.append(b.spilled))
    assert not run.memory.spill and seen == [True, False]


# ---------------------------------------------------------------- no hidden CPU


FAKE_DEVICE_ENGINES: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
    **{name: (lambda m, ids, run=run: run(m, ids, device="cpu").model) for name, run in ENGINES.items()},
    "w8a8-smoothquant-static": lambda m, ids: (
        quantize(
            m,
            QuantizeStep(scheme="w8a8", algorithm="gptq", smoothquant={"alpha": 0.5}, activations="static"),
            calibration=ids,
            device="cpu",
        ).model
    ),
    "wanda-2:4": lambda m, ids: prune(m, PruneStep(algorithm="wanda", pattern="2:4"), calibration=ids).model,
    "structured": lambda m, ids: (
        prune(
            m, PruneStep(algorithm="structured", targets={"layers": 0.5, "heads": 0.5, "mlp": 0.25}), calibration=ids
        ).model
    ),
}


@pytest.mark.parametrize("engine", sorted(FAKE_DEVICE_ENGINES))
def test_engines_put_every_tensor_beside_its_inputs(engine: str, calibration: torch.Tensor) -> None:
    """The fake device: with torch's default device set to ``meta``, any tensor an engine creates without
    saying where (the classic CUDA bug: a CPU tensor meeting CUDA ones) has no data, so the run fails or
    differs. It must give the model a normal run gives, through the torch loops CUDA uses."""
    run = FAKE_DEVICE_ENGINES[engine]
    model, twin = tiny_model(), tiny_model()
    with without_compiled_kernels():
        expected = _state(run(model, calibration))
        with torch.device("meta"):
            actual = _state(run(twin, calibration))
    _assert_identical(expected, actual)


def test_distillation_puts_every_tensor_beside_its_inputs() -> None:
    from tests.tiny import tiny_tokenizer
    from workers.compression.data import tokenize_stream
    from workers.compression.distill import build_student, distill
    from workers.compression.recipe import DistillStep, StudentSpec

    stream = tokenize_stream(tiny_tokenizer(), [sample_text(8)])
    teacher = tiny_model(seed=1, num_hidden_layers=4)
    student_config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    config = DistillStep(
        student=StudentSpec(config=student_config), max_steps=3, batch_size=4, seq_len=32, eval_every=2,
        hidden_states={"layer_map": [[1, 3]]},
    )  # fmt: skip
    student = build_student(teacher, config.student, seed=3)
    twin = copy.deepcopy(student)
    expected = distill(teacher, student, config, train_ids=stream[:2000], eval_ids=stream[2000:2400])
    with torch.device("meta"):
        actual = distill(teacher, twin, config, train_ids=stream[:2000], eval_ids=stream[2000:2400])
    _assert_identical(_state(expected.model), _state(actual.model))


# Every place an engine names the CPU, and why it must. A new one fails this test until it is justified here.
JUSTIFIED_CPU = {
    ("base.py", 'param.device if param is not None else torch.device("cpu")'): "a model without parameters",
    ("device.py", 'HARDWARE = ("auto", "cpu", "gpu")'): "the hardware names",
    ("device.py", 'if choice == "cpu":'): "hardware: cpu",
    ("device.py", 'return torch.device("cpu")'): "hardware: cpu, or auto without CUDA",
    ("device.py", 'device="cpu", pin_memory='): "spilled activations wait in host memory",
    ("distill.py", 'torch.randperm(num_rows, generator=generator, device="cpu")'): "one row order on every device",
    ("distill.py", 'torch.tensor(out, dtype=torch.long, device="cpu")'): "indices of the host-side rows",
    ("distill.py", 'nn.Linear(student_width, teacher_width, bias=False, device="cpu")'): "one seeded init everywhere",
    ("distill.py", 'cpu = torch.device("cpu")'): "DDP ranks receive the models through shared host memory",
    ("distill.py", 'torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")'): "a gloo rank",
    ("gguf.py", "tensor.detach().to(torch.float32).cpu().numpy()"): "GGUF tensors are written by numpy",
    ("gguf.py", "zp_param.detach().cpu()"): "GGUF blocks are built by numpy",
    ("gguf.py", "return value.detach().cpu()"): "GGUF blocks are built by numpy",
    ("heap.py", 'tensor.device.type != "cpu"'): "glibc's allocator serves host memory only",
    ("quantize.py", 'torch.empty(width, device="cpu").uniform_('): "one seeded probe on every device",
    ("streaming.py", 'module.to_empty(device="cpu")'): "the low-memory engine computes in host memory",
    ("streaming.py", 'tensor.detach().to("cpu")'): "shards are written from host memory",
    ("weight_quant.py", 'device.type == "cpu" and _COMPILED_KERNELS.get()'): "the numba loops are the CPU path",
}
_CPU_PATTERN = re.compile(r"""\.cpu\(\)|["']cpu["']""")


def test_every_place_an_engine_names_the_cpu_is_justified() -> None:
    found = set()
    for path in sorted((ROOT / "workers" / "compression").glob("*.py")):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            if not _CPU_PATTERN.search(code):
                continue
            matches = [key for key in JUSTIFIED_CPU if key[0] == path.name and key[1] in code]
            assert matches, f"{path.name}: {line.strip()} names the CPU; compute where the inputs are or justify it"
            found.update(matches)
    assert found == set(JUSTIFIED_CPU), f"justified but gone: {set(JUSTIFIED_CPU) - found}"
