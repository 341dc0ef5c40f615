"""The prepared GPU check (issue 19): every claim about CUDA workers, measured in one run of a few minutes.

``bench/gpu_check.sh`` runs this on a GPU machine (one H200, Python 3.12 with a CUDA build of torch,
transformers, safetensors and numba; no vLLM, no network). Steps, each timed and reported:

1. **environment**: torch/CUDA/transformers versions, the GPUs.
2. **cuda tests**: ``tests/workers/test_device_cuda.py`` in a child pytest (passed/skipped counted).
3. **reference model**: a Llama of SmolLM2-135M's shape (576 wide, 30 layers, 9 heads / 3 KV heads,
   49152 tokens) built from its config and *quickly trained* on the device for a few hundred steps on
   a synthetic Markov "language" (seeded: no corpus, no network), so that perplexity reacts to the
   weights; random weights would score the vocabulary size before and after anything.
4. **GPTQ W4A16 and SparseGPT 50 %** on that model on the GPU and on the CPU (the numba kernels there,
   the production CPU path): perplexity on held-out windows must agree within :data:`PPL_TOLERANCE`
   (the two devices round differently, so a few grid decisions flip); wall times side by side.
5. **larger than the GPU**: a random-weight Llama larger than a memory cap imposed with
   ``torch.cuda.set_per_process_memory_fraction``, quantized with GPTQ layer by layer (onloaded from
   host memory), once with activations on the device and once spilled; the measured CUDA peak against
   :func:`workers.compression.device.peak_bytes` and the cap.
6. **vLLM**: skipped with a message where vLLM is absent (``bench/vllm_check.sh --device cuda`` measures
   the outputs in vLLM where it is installed).
7. **DDP**: distillation on two GPUs (NCCL) when more than one is visible; skipped with a message otherwise.

``--dry-run`` runs the same steps on the CPU with tiny sizes in a minute or two (CI runs it, marked
``slow``): the "GPU" side is then the CPU running the torch loops a GPU runs, against the numba path, and
the cap is a budget handed to the engine instead of a CUDA memory fraction.

Prints progress to stderr; the JSON results and a markdown block for docs/BENCHMARKS.md to stdout;
also writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from workers.compression.base import device_of
from workers.compression.device import BUDGET_SHARE, LayerFootprint, cuda_environment, module_bytes, peak_bytes
from workers.compression.evaluate import perplexity
from workers.compression.prune import prune
from workers.compression.quantize import quantize
from workers.compression.recipe import PruneStep, QuantizeStep
from workers.compression.weight_quant import without_compiled_kernels

ROOT = Path(__file__).resolve().parent.parent
# GPU and CPU runs make the same decisions up to rounding: their perplexities may differ by this share.
PPL_TOLERANCE = 0.01
# The H200 session gives 8 minutes; steps that would start after this many seconds are skipped instead.
TIME_BUDGET_S = 420


@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of one mode."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    language_tokens: int  # the synthetic language uses the first this many token ids
    train_steps: int
    train_batch: int
    seq_len: int
    calibration_rows: int
    eval_windows: int
    big_hidden: int
    big_intermediate: int
    big_layers: int
    big_heads: int
    big_kv_heads: int
    big_vocab: int
    cap_bytes: int


FULL = Sizes(
    hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, language_tokens=4096,
    train_steps=300, train_batch=32, seq_len=256, calibration_rows=32, eval_windows=16,
    big_hidden=2048, big_intermediate=5632, big_layers=16, big_heads=16, big_kv_heads=4, big_vocab=32000,
    cap_bytes=5 * 2**29,  # 2.5 GiB: the model (3.2 GiB) exceeds it, one layer's calibration (1.6 GiB) fits
)  # fmt: skip
DRY = Sizes(
    hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, language_tokens=128,
    train_steps=30, train_batch=8, seq_len=64, calibration_rows=16, eval_windows=4,
    big_hidden=128, big_intermediate=256, big_layers=12, big_heads=4, big_kv_heads=2, big_vocab=512,
    cap_bytes=7 * 2**20,  # the model (7.26 MiB) exceeds it; one layer resident (6.1 MiB accounted) fits
)  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: dict[str, Any], key: str) -> Iterator[None]:
    """Wall seconds of the block into ``into[key]``, the device drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    into[key] = round(time.perf_counter() - start, 3)


# ---------------------------------------------------------------- the synthetic language


def markov_rows(rows: int, length: int, tokens: int, seed: int) -> torch.Tensor:
    """``[rows, length]`` token ids from a seeded first-order Markov chain over ``tokens`` ids: each id has
    four successors with Zipf-like probabilities (0.6, 0.2, 0.12, 0.08), so a trained model reaches a
    perplexity near 3 and any damage to its weights shows."""
    table = torch.Generator().manual_seed(1234)  # one language for every seed
    successors = torch.randint(0, tokens, (tokens, 4), generator=table)
    probabilities = torch.tensor([0.6, 0.2, 0.12, 0.08])
    sampler = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, tokens, (rows,), generator=sampler)
    for position in range(1, length):
        choice = torch.multinomial(probabilities.expand(rows, 4), 1, generator=sampler).squeeze(1)
        out[:, position] = successors[out[:, position - 1], choice]
    return out


# ---------------------------------------------------------------- models


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=100000.0, **extra,
    )  # fmt: skip


def reference_model(sizes: Sizes, device: torch.device, facts: dict[str, Any]) -> nn.Module:
    """SmolLM2-135M's shape (tied embeddings), quickly trained on the synthetic language on ``device``;
    returned in float32 in host memory."""
    from transformers import AutoModelForCausalLM

    config = llama(sizes.hidden, sizes.intermediate, sizes.layers, sizes.heads, sizes.kv_heads, sizes.vocab)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    steps = sizes.train_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    data = markov_rows(steps * sizes.train_batch, sizes.seq_len + 1, sizes.language_tokens, seed=1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses = []
    with timed(device, facts, "train_seconds"):
        for step in range(steps):
            batch = data[step * sizes.train_batch : (step + 1) * sizes.train_batch].to(device)
            with autocast:
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                losses.append(round(float(loss.detach()), 4))
    model.eval()
    facts.update(
        {
            "weights": f"trained {steps} steps on a seeded Markov language over {sizes.language_tokens} ids",
            "train_losses": losses,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    )
    return model.to("cpu")


def big_model(sizes: Sizes) -> nn.Module:
    """A Llama larger than the cap, random weights (normal, std 0.02) made fast: shapes on ``meta``,
    storage in host memory, filled in place."""
    from transformers import AutoModelForCausalLM

    config = llama(
        sizes.big_hidden, sizes.big_intermediate, sizes.big_layers, sizes.big_heads, sizes.big_kv_heads, sizes.big_vocab
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    for parent in list(model.modules()):  # rotary inverse frequencies are computed at init, not stored
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=model.config))
    return model.eval()


# ---------------------------------------------------------------- steps


def step_environment(device: torch.device) -> dict[str, Any]:
    import numba
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numba": numba.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "gpu": cuda_environment(),
    }


def step_cuda_tests() -> dict[str, Any]:
    """The CUDA tests in a child pytest; without CUDA they are all skipped, and counted."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "tests/workers/test_device_cuda.py",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_child_env())
    output = done.stdout + done.stderr
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors)\b", output)}
    return {
        "command": " ".join(command[1:]),
        "returncode": done.returncode,
        "counts": counts,
        "seconds": round(time.perf_counter() - started, 3),
        "tail": output[-1500:] if done.returncode else output[-400:],
    }


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


ENGINES: dict[str, Callable[..., Any]] = {
    "gptq_w4a16": lambda model, ids, device: quantize(
        model, QuantizeStep(scheme="w4a16", algorithm="gptq"), calibration=ids, device=device
    ),
    "sparsegpt_50": lambda model, ids, device: prune(
        model, PruneStep(algorithm="sparsegpt", sparsity=0.5), calibration=ids, device=device
    ),
}


def step_device_vs_cpu(
    reference: nn.Module, device: torch.device, calibration: torch.Tensor, held_out: torch.Tensor, dry: bool
) -> dict[str, Any]:
    """Each engine on the device and on the CPU from the same trained weights: perplexity and wall time."""
    out: dict[str, Any] = {}
    baseline: dict[str, float] = {}
    for side, where in (("device", device), ("cpu", torch.device("cpu"))):
        model = copy.deepcopy(reference).to(where)
        baseline[side] = perplexity(model, held_out)
        del model
    out["baseline_perplexity"] = baseline
    for name, engine in ENGINES.items():
        row: dict[str, Any] = {}
        for side, where in (("device", device), ("cpu", torch.device("cpu"))):
            model = copy.deepcopy(reference).to(where)
            # A dry run's "device" is the CPU running the torch loops a GPU runs (the CPU side runs numba).
            loops = without_compiled_kernels() if dry and side == "device" else nullcontext()
            with loops, timed(where, row, f"{side}_seconds"):
                engine(model, calibration, where)
            row[f"{side}_perplexity"] = perplexity(model, held_out)
            del model
        row["relative_difference"] = abs(row["device_perplexity"] - row["cpu_perplexity"]) / row["cpu_perplexity"]
        row["equal_within_tolerance"] = row["relative_difference"] <= PPL_TOLERANCE
        row["speedup"] = round(row["cpu_seconds"] / max(row["device_seconds"], 1e-9), 2)
        out[name] = row
        log(f"{name}: device {row['device_seconds']} s ppl {row['device_perplexity']:.4f}, "
            f"cpu {row['cpu_seconds']} s ppl {row['cpu_perplexity']:.4f}")  # fmt: skip
    return out


def step_larger_than_the_device(sizes: Sizes, device: torch.device, calibration: torch.Tensor) -> dict[str, Any]:
    """GPTQ on a model larger than a memory cap, one layer at a time, activations resident then spilled."""
    model = big_model(sizes)
    weights = module_bytes(model)
    out: dict[str, Any] = {"model_bytes": weights, "cap_bytes": sizes.cap_bytes, "weights": "random (normal, std 0.02)"}
    if weights <= sizes.cap_bytes:
        raise RuntimeError(f"the big model ({weights} bytes) must exceed the cap ({sizes.cap_bytes} bytes)")
    budget: int | None = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(sizes.cap_bytes / total, device)
        out["memory_fraction"] = round(sizes.cap_bytes / total, 6)
        if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
            # An older torch cannot tell the engine the cap (device_budget would see the free memory).
            budget = int(BUDGET_SHARE * sizes.cap_bytes)
            out["budget_from"] = "the cap, handed over (this torch has no get_per_process_memory_fraction)"
    else:
        budget = sizes.cap_bytes  # the fake device budget: the same accounting decides
    twin = copy.deepcopy(model)  # the same weights for the spilled run
    try:
        for mode in ("resident", "spilled"):
            run_model = model if mode == "resident" else twin
            run_budget = budget
            if mode == "spilled":
                # Between the spilled and the resident peak: the plan must spill, and stay under it.
                resident = LayerFootprint(**out["resident"]["footprint"])
                run_budget = (peak_bytes(resident, spill=True) + peak_bytes(resident, spill=False)) // 2
            row: dict[str, Any] = {}
            with timed(device, row, "seconds"):
                facts = quantize(
                    run_model,
                    QuantizeStep(scheme="w4a16", algorithm="gptq"),
                    calibration=calibration,
                    device=device,
                    budget=run_budget,
                ).facts
            memory = facts["device_memory"]
            row.update(
                {
                    "onload": memory["onload"],
                    "spill": memory["spill"],
                    "budget_bytes": memory["budget_bytes"],
                    "expected_peak_bytes": memory["expected_peak_bytes"],
                    "measured_peak_bytes": memory["measured_peak_bytes"],
                    "footprint": memory["footprint"],
                    "model_in_host_memory": device_of(run_model).type == "cpu",
                }
            )
            if memory["measured_peak_bytes"] is not None:
                row["measured_over_expected"] = round(memory["measured_peak_bytes"] / memory["expected_peak_bytes"], 3)
                row["under_cap"] = memory["measured_peak_bytes"] <= sizes.cap_bytes
            out[mode] = row
            log(f"larger than the device, {mode}: {row['seconds']} s, spill {row['spill']}, expected "
                f"{row['expected_peak_bytes']} B, measured {row['measured_peak_bytes']} B")  # fmt: skip
        out["spilled_equals_resident"] = all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True)
        )
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out


def step_vllm() -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here; bench/vllm_check.sh --device cuda measures the outputs in vLLM"}
    return {"skipped": "vLLM is installed: run bench/vllm_check.sh --device cuda (it needs the reference checkpoint)"}


def step_ddp(device: torch.device, dry: bool) -> dict[str, Any]:
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        return {"skipped": f"{count} GPU(s) visible; the 2-GPU DDP run needs two"}
    from tests.tiny import sample_text, tiny_model, tiny_tokenizer
    from workers.compression.data import tokenize_stream
    from workers.compression.distill import build_student, distill
    from workers.compression.recipe import DistillStep, StudentSpec

    stream = tokenize_stream(tiny_tokenizer(), [sample_text(40)])
    teacher = tiny_model(seed=1, num_hidden_layers=4).to(device)
    config = DistillStep(
        student=StudentSpec(from_teacher={"layers": [0, 3]}), max_steps=20, batch_size=8, seq_len=64,
        learning_rate=3e-3, eval_every=1000, checkpoint_every=1000,
    )  # fmt: skip
    out: dict[str, Any] = {}
    for world in (1, 2):
        student = build_student(teacher, config.student)
        with timed(device, out, f"world_{world}_seconds"):
            outcome = distill(teacher, student, config, train_ids=stream, world_size=world)
        out[f"world_{world}_train_loss"] = outcome.facts["train_loss"]
        out[f"world_{world}_ranks"] = outcome.facts["world_size"]
    return out


# ---------------------------------------------------------------- the run


def run(dry: bool) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = DRY if dry else FULL
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --dry-run on a CPU machine")
    if dry:
        # Tiny matrices gain nothing from threads, and on a shared machine the threads' barriers wait on
        # each other (measured at load 12 on 2 cores: a tiny forward 1.4 s with 2 threads, 0.02 s with 1).
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    results: dict[str, Any] = {"mode": "dry-run (CPU, tiny sizes)" if dry else "gpu", "sizes": asdict(sizes)}
    results["environment"] = step_environment(device)
    log(f"environment: {results['environment']}")

    def within_budget(name: str) -> bool:
        elapsed = time.perf_counter() - started
        if elapsed > TIME_BUDGET_S:
            results[name] = {"skipped": f"time budget: {elapsed:.0f} s of {TIME_BUDGET_S} s already spent"}
            log(f"{name}: skipped (time budget)")
            return False
        return True

    log("cuda tests")
    results["cuda_tests"] = step_cuda_tests()
    log(f"cuda tests: {results['cuda_tests']['counts']} (rc {results['cuda_tests']['returncode']})")

    log("reference model: building and training")
    reference_facts: dict[str, Any] = {}
    reference = reference_model(sizes, device, reference_facts)
    results["reference_model"] = reference_facts
    calibration = markov_rows(sizes.calibration_rows, sizes.seq_len, sizes.language_tokens, seed=2)
    held_out = markov_rows(sizes.eval_windows, sizes.seq_len, sizes.language_tokens, seed=3)
    if within_budget("device_vs_cpu"):
        results["device_vs_cpu"] = step_device_vs_cpu(reference, device, calibration, held_out, dry)
    del reference
    if within_budget("larger_than_device"):
        log("larger than the device")
        results["larger_than_device"] = step_larger_than_the_device(sizes, device, calibration)
    results["vllm"] = step_vllm()
    if within_budget("ddp"):
        results["ddp"] = step_ddp(device, dry)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["ok"] = _ok(results)
    return results


def _ok(results: dict[str, Any]) -> bool:
    tests = results["cuda_tests"]
    fine = tests["returncode"] in (0, 5) and not tests["counts"].get("failed") and not tests["counts"].get("error")
    comparison = results.get("device_vs_cpu", {})
    fine &= all(row.get("equal_within_tolerance", True) for row in comparison.values() if isinstance(row, dict))
    big = results.get("larger_than_device", {})
    fine &= big.get("spilled_equals_resident", True)
    for mode in ("resident", "spilled"):
        row = big.get(mode, {})
        fine &= row.get("under_cap", True) and (row.get("spill") is (mode == "spilled") if row else True)
    return bool(fine)


def markdown(results: dict[str, Any]) -> str:
    """The block docs/BENCHMARKS.md carries."""
    env = results["environment"]
    gpu = env.get("gpu") or {}
    gpus = ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in gpu.get("gpus", [])) or "none"
    lines = [
        f"### GPU check ({results['mode']}, {results['seconds']} s)",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, Python {env['python']}; "
        f"GPUs: {gpus}; CPU threads: {env['cpu_threads']}.",
        "",
        f"CUDA tests: {results['cuda_tests']['counts']} (`{results['cuda_tests']['command']}`).",
        "",
    ]
    ref = results["reference_model"]
    losses = ref["train_losses"]
    lines += [
        f"Reference model: Llama, SmolLM2-135M shape, {ref['parameters']:,} parameters, {ref['weights']} "
        f"({ref['train_seconds']} s; loss {losses[0]} → {losses[-1]}).",
        "",
    ]
    comparison = results.get("device_vs_cpu", {})
    if "skipped" in comparison:
        lines += [f"Device vs CPU: skipped ({comparison['skipped']}).", ""]
    elif comparison:
        base = comparison["baseline_perplexity"]
        lines += [
            f"Held-out perplexity before: device {base['device']:.4f}, CPU {base['cpu']:.4f}.",
            "",
            f"| engine | device s | CPU s | speed-up | device ppl | CPU ppl | rel. diff | within {PPL_TOLERANCE:.0%} |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name in ENGINES:
            row = comparison[name]
            lines.append(
                f"| {name} | {row['device_seconds']} | {row['cpu_seconds']} | {row['speedup']}x | "
                f"{row['device_perplexity']:.4f} | {row['cpu_perplexity']:.4f} | {row['relative_difference']:.2e} | "
                f"{'yes' if row['equal_within_tolerance'] else 'NO'} |"
            )
        lines.append("")
    big = results.get("larger_than_device", {})
    if "skipped" in big:
        lines += [f"Larger than the device: skipped ({big['skipped']}).", ""]
    elif big:
        lines += [
            f"Larger than the device: {big['model_bytes'] / 2**20:.0f} MiB of weights ({big['weights']}) under a "
            f"{big['cap_bytes'] / 2**20:.0f} MiB cap, GPTQ W4A16 one layer at a time; spilled result identical "
            f"to resident: {big['spilled_equals_resident']}.",
            "",
            "| activations | s | expected peak MiB | measured peak MiB | measured / expected |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode in ("resident", "spilled"):
            row = big[mode]
            measured = row["measured_peak_bytes"]
            lines.append(
                f"| {mode} | {row['seconds']} | {row['expected_peak_bytes'] / 2**20:.1f} | "
                f"{measured / 2**20 if measured is not None else float('nan'):.1f} | "
                f"{row.get('measured_over_expected', '—')} |"
            )
        lines.append("")
    for key, label in (("vllm", "vLLM"), ("ddp", "DDP")):
        value = results.get(key, {})
        lines.append(f"{label}: {value['skipped'] if 'skipped' in value else json.dumps(value)}")
    lines.append("")
    lines.append(f"All checks passed: {'yes' if results['ok'] else 'NO'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the whole script in a minute or two")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)
    results = run(args.dry_run)
    text = markdown(results)
    print(json.dumps(results, indent=2, default=str))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "gpu_check.md").write_text(text)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
