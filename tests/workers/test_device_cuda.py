"""The CUDA branches: the same engines on a GPU, layers onloaded from host memory, memory measured.

Skipped without CUDA (``pytest -ra`` lists them with the reason); ``bench/gpu_check.sh`` runs them on a
GPU machine. The tiny models keep each test to seconds there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.tiny import tiny_model
from workers.compression.device import LayerFootprint, cuda_environment, cuda_problem, peak_bytes, resolve_device
from workers.compression.evaluate import perplexity
from workers.compression.prune import prune
from workers.compression.quantize import quantize
from workers.compression.recipe import PruneStep, QuantizeStep
from workers.compression.weight_quant import without_compiled_kernels

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (no GPU here): bench/gpu_check.sh runs these on a GPU machine"
)

GPTQ = QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=32)


@pytest.fixture(autouse=True, scope="module")
def _cublas_ready() -> None:
    """cuBLAS takes its workspace (MiBs, through torch's allocator) at its first matmul: outside the
    measured loops, whose tiny models need less than that."""
    a = torch.ones(64, 64, device="cuda")
    (a @ a).sum().item()
    (a.bfloat16() @ a.bfloat16()).sum().item()


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(8))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_a_gpu_worker_finds_cuda_and_describes_it() -> None:
    assert cuda_problem() is None
    assert resolve_device("gpu").type == resolve_device("auto").type == "cuda"
    environment = cuda_environment()
    assert environment is not None and environment["gpus"][0]["memory_bytes"] > 0 and environment["gpus"][0]["name"]


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(lambda m, ids, **kw: quantize(m, GPTQ, calibration=ids, **kw), id="gptq"),
        pytest.param(
            lambda m, ids, **kw: prune(m, PruneStep(algorithm="sparsegpt", sparsity=0.5), calibration=ids, **kw),
            id="sparsegpt",
        ),
    ],
)
def test_layers_onloaded_to_the_gpu_give_the_cpu_result(engine, calibration, held_out) -> None:  # type: ignore[no-untyped-def]
    """Model in host memory, one layer at a time on the GPU: the CPU's quality (the kernels round
    differently, so a few grid decisions may differ), the model back in host memory, and a measured
    peak within the accounting."""
    on_cpu, onloaded = tiny_model(), tiny_model()
    with without_compiled_kernels():  # the torch loops the GPU runs
        engine(on_cpu, calibration, device="cpu")
    outcome = engine(onloaded, calibration, device="cuda")
    memory = outcome.facts["device_memory"]
    assert memory["onload"] is True and memory["device"].startswith("cuda") and memory["spill"] is False
    assert all(p.device.type == "cpu" for p in onloaded.parameters())
    assert 0 < memory["measured_peak_bytes"] <= memory["expected_peak_bytes"]
    assert peak_bytes(LayerFootprint(**memory["footprint"]), spill=False) == memory["expected_peak_bytes"]
    cpu_ppl, gpu_ppl = perplexity(on_cpu, held_out), perplexity(onloaded, held_out)
    assert abs(gpu_ppl - cpu_ppl) / cpu_ppl < 0.02, (cpu_ppl, gpu_ppl)


def test_spilled_activations_on_the_gpu_change_nothing(calibration: torch.Tensor) -> None:
    resident, spilled = tiny_model(), tiny_model()
    kept = quantize(resident, GPTQ, calibration=calibration, device="cuda").facts["device_memory"]
    memory = quantize(spilled, GPTQ, calibration=calibration, device="cuda", budget=1).facts["device_memory"]
    assert memory["spill"] is True and kept["spill"] is False
    assert memory["measured_peak_bytes"] <= memory["expected_peak_bytes"]
    a, b = _state(resident), _state(spilled)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_on_the_gpu_is_calibrated_in_place(calibration: torch.Tensor) -> None:
    model = tiny_model().to("cuda")
    memory = quantize(model, GPTQ, calibration=calibration).facts["device_memory"]
    assert memory["onload"] is False and memory["footprint"]["weights"] == 0
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_distillation_on_the_gpu_learns_under_bf16_autocast() -> None:
    from tests.tiny import sample_text, tiny_tokenizer
    from workers.compression.data import tokenize_stream
    from workers.compression.distill import build_student, distill
    from workers.compression.recipe import DistillStep, StudentSpec

    stream = tokenize_stream(tiny_tokenizer(), [sample_text(8)])
    teacher = tiny_model(seed=1, num_hidden_layers=4).to("cuda")
    config = DistillStep(
        student=StudentSpec(from_teacher={"layers": [0, 3]}), max_steps=12, batch_size=4, seq_len=32,
        learning_rate=3e-3, eval_every=1000, checkpoint_every=1000,
    )  # fmt: skip
    student = build_student(teacher, config.student)
    events: list[dict[str, float]] = []
    from workers.compression.base import Callbacks

    outcome = distill(teacher, student, config, train_ids=stream, callbacks=Callbacks(metrics=events.append))
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert next(outcome.model.parameters()).device.type == "cuda"
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_the_pipeline_on_a_gpu_records_the_gpu_and_each_steps_peak(tmp_path: Path) -> None:
    from tests.helpers import gptq_pipeline_report

    report = gptq_pipeline_report(tmp_path, hardware="gpu", measure_speed=True)
    assert report["environment"]["gpus"][0]["memory_bytes"] > 0
    assert (
        report["baseline"]["device"].startswith("cuda")
        and report["result"]["memory_method"] == "cuda_max_memory_allocated"
    )
    assert report["steps"][0]["peak_device_memory_bytes"] > 0
    assert report["steps"][0]["details"]["device_memory"]["onload"] is False  # a tiny model lives on the GPU whole
