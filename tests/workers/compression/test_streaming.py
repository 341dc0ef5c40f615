"""Low-memory (layer-streaming) quantization: same output as the in-memory engine, and it completes
in a process whose memory is capped below the model's size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.tiny import sample_text, tiny_tokenizer, write_model_dir
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.compression.evaluate import perplexity
from workers.compression.export import load_model, save_model
from workers.compression.quantize import quantize
from workers.compression.recipe import QuantizeStep, Recipe
from workers.compression.streaming import ShardWriter, quantize_streaming
from workers.compression.weight_quant import without_compiled_kernels

# The calibrated cases take tens of seconds each: `make test` runs them, the fast tier runs the FP8 one.
CASES = [
    pytest.param(
        "llama", {"scheme": "w4a16", "group_size": 32, "algorithm": "gptq", "act_order": True}, marks=pytest.mark.slow
    ),
    pytest.param(
        "llama", {"scheme": "w4a16", "group_size": 32, "algorithm": "awq", "symmetric": False}, marks=pytest.mark.slow
    ),
    # Untied lm_head quantized too (ignore=[]), static activation scales after SmoothQuant, biases (Qwen2).
    pytest.param(
        "qwen2",
        {"scheme": "w8a8", "activations": "static", "algorithm": "gptq", "smoothquant": {"alpha": 0.5}, "ignore": []},
        marks=pytest.mark.slow,
    ),
    ("qwen2", {"scheme": "fp8", "algorithm": "rtn"}),
]


@pytest.mark.parametrize(("arch", "options"), CASES)
def test_streaming_writes_what_the_in_memory_engine_writes(arch: str, options: dict[str, Any], tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "in", arch=arch, num_hidden_layers=3)
    step = QuantizeStep(method="quantize", **options)
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 256, (8, 32), generator=gen)
    eval_ids = torch.randint(0, 256, (3, 32), generator=gen)

    # Tiny output shards so the index/multi-shard path is exercised.
    outcome, stream = quantize_streaming(
        model_dir, step, tmp_path / "streamed", calibration=calibration, eval_ids=eval_ids, max_shard_bytes=20_000
    )
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert outcome.facts["mode"] == "layer_streaming"

    model, tokenizer = load_model(model_dir)
    assert stream.perplexity_before == perplexity(model, eval_ids)
    # Low-memory mode runs GPTQ's torch loops (see quantize_streaming); with the same loops the two
    # engines must write the same bits.
    with without_compiled_kernels():
        quantize(model, step, calibration=calibration)
    assert stream.perplexity_after == perplexity(model, eval_ids)
    save_model(model, tokenizer, tmp_path / "in_memory")

    streamed, tok = load_model(tmp_path / "streamed")
    reference, _ = load_model(tmp_path / "in_memory")
    assert tok is not None
    ids = torch.randint(0, 256, (2, 24), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (
        config["quantization_config"]
        == json.loads((tmp_path / "in_memory" / "config.json").read_text())["quantization_config"]
    )


def test_streaming_cancels_between_layers(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "in", num_hidden_layers=3)
    seen: list[str] = []
    callbacks = Callbacks(progress=lambda _f, m: seen.append(m), should_stop=lambda: any("layer 2/" in m for m in seen))
    with pytest.raises(StepCancelled):
        quantize_streaming(
            model_dir, QuantizeStep(method="quantize", scheme="w8a16"), tmp_path / "out", callbacks=callbacks
        )
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_streaming_refuses_a_tied_lm_head_target(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "in", tie_word_embeddings=True)
    step = QuantizeStep(method="quantize", scheme="w8a16", ignore=[])
    with pytest.raises(EngineError, match="tied"):
        quantize_streaming(model_dir, step, tmp_path / "out")


def test_shard_writer_streams_every_dtype_into_valid_safetensors(tmp_path: Path) -> None:
    """Tensors go to disk as they come; the shards safetensors reads back hold them bit for bit, with
    the index transformers reads when there are several."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight_packed": torch.randint(-(2**31), 2**31 - 1, (64, 8), dtype=torch.int32, generator=gen),
        "a.weight_scale": torch.randn(64, 2, generator=gen).to(torch.bfloat16),
        "a.weight_zero_point": torch.randint(-8, 8, (64, 2), dtype=torch.int8, generator=gen),
        "a.weight_shape": torch.tensor([64, 64], dtype=torch.int64),
        "b.weight": torch.randn(32, 16, generator=gen).to(torch.float8_e4m3fn),
        "b.mask": torch.rand(3, 5, generator=gen) > 0.5,
        "c.scalar": torch.tensor(1.5),
        "c.empty": torch.zeros(0, 4, dtype=torch.float16),
        "d.weight": torch.randn(8, 8, generator=gen).T,  # non-contiguous input
    }
    writer = ShardWriter(tmp_path, max_shard_bytes=2048)
    for key, value in tensors.items():
        writer.add({key: value})
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1
    assert not list(tmp_path.glob(".shard-*"))
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(str(tmp_path / shard)))
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key

    single = tmp_path / "single"
    single.mkdir()
    writer = ShardWriter(single)
    writer.add(tensors)
    writer.finish()
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]
    assert set(load_file(str(single / "model.safetensors"))) == set(tensors)


def test_low_memory_is_only_for_one_quantize_step() -> None:
    quantize_step = {"method": "quantize", "scheme": "w8a16"}
    assert Recipe.model_validate({"steps": [quantize_step], "low_memory": True}).low_memory is True
    with pytest.raises(ValidationError, match="exactly one quantize step"):
        Recipe.model_validate({"steps": [quantize_step, quantize_step], "low_memory": True})
    # false / null are always accepted
    Recipe.model_validate(
        {"steps": [{"method": "prune", "algorithm": "magnitude", "sparsity": 0.5}], "low_memory": False}
    )


# ---------------------------------------------------------------- memory cap

# 24 layers of 37.7 MB: a 905 MB float32 checkpoint, well above the cap below, which itself must
# hold the Python/torch/transformers runtime (~350 MB), one layer with its GPTQ work and the
# compressed output waiting for its shard.
BIG = {
    "vocab_size": 256,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
CAP_BYTES = 680 * 2**20

CAPPED_CHILD = textwrap.dedent(
    """
    import resource, sys
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    from app.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _write_big_model(path: Path) -> int:
    """A random-weight Llama written shard by shard (never whole in this process either); returns its bytes."""
    path.mkdir(parents=True)
    config = LlamaConfig(**BIG)
    config.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, param in skeleton.named_parameters():
        parts = name.split(".")
        group = ".".join(parts[:3]) if parts[1:2] == ["layers"] else parts[0]
        groups.setdefault(group, {})[name] = tuple(param.shape)
    weight_map, total = {}, 0
    for index, (_group, shapes) in enumerate(groups.items()):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * 4 for t in tensors.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_doc))
    return total


def _capped_compress(
    model_dir: Path, out: Path, recipe: Path, calibration: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    args = ["compress", str(model_dir), "--recipe", str(recipe), "--out", str(out), "--calibration", str(calibration)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-c", CAPPED_CHILD, str(CAP_BYTES), *args, "--no-speed", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).resolve().parents[3],
    )


@pytest.mark.slow
def test_gptq_completes_under_a_memory_cap_below_the_model_size(tmp_path: Path) -> None:
    model_bytes = _write_big_model(tmp_path / "big")
    assert model_bytes > CAP_BYTES * 1.25
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                # GPTQ on the attention projections only, to keep the test short: the MLP weights
                # still stream through memory, layer by layer, as in any run.
                "steps": [
                    {
                        "method": "quantize",
                        "scheme": "w4a16",
                        "group_size": 128,
                        "algorithm": "gptq",
                        "ignore": ["lm_head", "re:.*mlp\\..*"],
                    }
                ],
                "calibration": {"num_samples": 4, "seq_len": 64},
                "evaluation": {"seq_len": 64, "max_tokens": 2048},  # MIN_PERPLEXITY_TOKENS
            }
        )
    )
    calibration = tmp_path / "calib.txt"
    calibration.write_text(sample_text(60))

    # The cap is real: loading the model whole fails under it.
    refused = _capped_compress(tmp_path / "big", tmp_path / "whole", recipe, calibration, "--no-low-memory")
    assert refused.returncode != 0
    assert "memory" in refused.stderr.lower(), refused.stderr[-2000:]

    done = _capped_compress(tmp_path / "big", tmp_path / "out", recipe, calibration, "--low-memory")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    details = report["steps"][0]["details"]
    assert details["mode"] == "layer_streaming"
    assert details["quantized_modules"] == 24 * 4
    # The resident set also counts the shard pages read through mmap (file-backed, outside the cap),
    # and still stays below the model's own size.
    assert details["peak_rss_bytes"] < model_bytes
    assert math.isfinite(report["baseline"]["perplexity"]) and math.isfinite(report["result"]["perplexity"])
    # A third of each layer in int4 (groups of 128), the MLP still float32.
    assert 0.6 < report["summary"]["size_ratio"] < 0.8
    # Over 256 MiB of weights: several shards and their index, named the transformers way.
    assert (tmp_path / "out" / "model" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_low_memory_mode_keeps_llvm_out_of_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled loops would map ~105 MiB of LLVM into a run whose point is its footprint: the
    low-memory engine must take the torch loops, while the in-memory engine on a CPU takes the compiled ones."""
    from workers.compression import kernels

    calls: list[str] = []
    real_gptq, real_clip = kernels.gptq_columns, kernels.best_clip

    def gptq_columns(*args: Any) -> None:
        calls.append("gptq")
        real_gptq(*args)

    def best_clip(*args: Any) -> torch.Tensor:
        calls.append("clip")
        return real_clip(*args)

    monkeypatch.setattr(kernels, "gptq_columns", gptq_columns)
    monkeypatch.setattr(kernels, "best_clip", best_clip)
    model_dir = write_model_dir(tmp_path / "in", num_hidden_layers=2)
    step = QuantizeStep(method="quantize", scheme="w4a16", group_size=32, algorithm="gptq", act_order=True)
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_streaming(model_dir, step, tmp_path / "out", calibration=calibration)
    assert calls == []
    model, _ = load_model(model_dir)
    quantize(model, step, calibration=calibration)
    assert {"gptq", "clip"} <= set(calls)


@pytest.mark.slow
def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    """Linux carries ``ru_maxrss`` across fork + exec: a CLI or worker started by a large parent would
    report the parent's size as its own peak. The engine reads ``VmHWM`` of its own address space."""
    ballast = bytearray(1536 * 2**20)
    for i in range(0, len(ballast), 4096):  # touch every page: resident in this (parent) process
        ballast[i] = 1
    code = "from workers.compression.streaming import _peak_rss_bytes; print(_peak_rss_bytes())"
    child = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    del ballast
    assert int(child.stdout) < 1024 * 2**20, child.stdout
