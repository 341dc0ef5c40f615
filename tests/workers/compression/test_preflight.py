"""Model preflight: a lying config.json, a broken safetensors file or a model without an LM head is refused
before transformers reads a byte of weights, naming the file, tensor or field; non-finite weights never pass."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import StopAfter
from tests.tiny import tiny_model, write_model_dir
from workers.compression.base import EngineError, StepCancelled
from workers.compression.export import inspect_model_dir, load_model, save_model
from workers.compression.preflight import read_safetensors_header
from workers.compression.recipe import Recipe
from workers.pipeline import PipelineInputs, run_pipeline


def _edit_config(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite_weights(model_dir: Path, edit: Any) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


def test_a_sound_model_passes_and_is_counted(model_dir: Path) -> None:
    checked = inspect_model_dir(model_dir)
    assert checked.elements == sum(p.numel() for p in tiny_model().parameters())
    assert checked.float32_bytes == 4 * checked.elements
    assert checked.tensors["model.embed_tokens.weight"].shape == (256, 64)


def test_a_truncated_file_is_refused_naming_it(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(EngineError, match=r"model.safetensors is truncated or corrupt: tensor '.+' ends at data byte"):
        load_model(model_dir)


def test_a_header_length_past_the_end_is_refused(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(EngineError, match=r"model.safetensors is truncated: its header ends at byte 10008, the file"):
        read_safetensors_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(EngineError, match=r"model.safetensors is not a safetensors file"):
        read_safetensors_header(path)


def test_a_header_that_is_not_json_or_lies_about_sizes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(EngineError, match=r"x.safetensors: the safetensors header is not valid JSON"):
        read_safetensors_header(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(EngineError, match=r"tensor 'w' \(F32 \[4, 4\]\) should take 64 bytes, its offsets span 32"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"vocab_size": 1_000_000_000},
            r"tensor 'model.embed_tokens.weight' in model.safetensors has shape \[256, 64\], "
            r"but config.json implies \[1000000000, 64\]",
        ),
        ({"vocab_size": 1e9}, r"config.json vocab_size must be a positive integer, got 1000000000.0"),
        ({"num_hidden_layers": 1_000_000}, r"num_hidden_layers is 1000000, but the checkpoint has layers 0..1 \(2 of"),
        (
            {"intermediate_size": 96},
            r"tensor 'model.layers.0.mlp.gate_proj.weight' in model.safetensors has shape \[128, 64\], "
            r"but config.json implies \[96, 64\]",
        ),
        (
            {"num_key_value_heads": 4},
            r"tensor 'model.layers.0.self_attn.k_proj.weight' .+ shape \[32, 64\], but config.json implies \[64, 64\]",
        ),
    ],
)
def test_a_config_that_disagrees_with_the_weights_is_refused_before_anything_is_built(
    model_dir: Path, changes: dict[str, Any], message: str
) -> None:
    """A config that would make transformers allocate a terabyte or build a million layers is refused from the
    headers alone: well under a second, where building the model would take minutes or exhaust memory."""
    _edit_config(model_dir, **changes)
    started = time.perf_counter()
    with pytest.raises(EngineError, match=message):
        load_model(model_dir)
    assert time.perf_counter() - started < 10


def test_a_model_without_a_causal_lm_head_class_is_refused(tmp_path: Path) -> None:
    """A BertModel (no LM head) would load as BertLMHeadModel with a random head; it is refused by name."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(EngineError, match=r"architectures \['BertModel'\] is not a causal language model .+BertLMHead"):
        load_model(tmp_path / "bert")
    _edit_config(tmp_path / "bert", architectures=["BertLMHeadModel"])  # the right class, still no head weights
    with pytest.raises(
        EngineError, match=r"the checkpoint lacks .+ weight\(s\) the model needs, e.g. cls\.predictions"
    ):
        load_model(tmp_path / "bert")
    _edit_config(tmp_path / "bert", model_type="roberta-nonsense")
    with pytest.raises(EngineError, match=r"model_type 'roberta-nonsense' is not a causal language model"):
        load_model(tmp_path / "bert")


def test_an_untied_model_without_its_lm_head_is_refused_and_a_tied_one_loads(model_dir: Path) -> None:
    _rewrite_weights(model_dir, lambda tensors: tensors.pop("lm_head.weight"))
    with pytest.raises(
        EngineError, match=r"no LM head \('lm_head.weight'\) and config.json tie_word_embeddings is fal"
    ):
        load_model(model_dir)
    _edit_config(model_dir, tie_word_embeddings=True)
    model, _ = load_model(model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_shard_index_that_names_the_wrong_file_is_refused(model_dir: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EngineError, match=r"puts tensor 'lm_head.weight' in 'model-00002-of-00002.safetensors', but"):
        inspect_model_dir(model_dir)


def test_non_finite_weights_are_refused_on_load_and_on_save(model_dir: Path, tmp_path: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.mlp.down_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])

    _rewrite_weights(model_dir, poison)
    message = r"the input model has non-finite weights: 2 NaN/inf values in 'model.layers.1.mlp.down_proj.weight'"
    with pytest.raises(EngineError, match=message):
        load_model(model_dir)
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(EngineError, match=r"the compressed model has non-finite weights: 1 NaN/inf values in 'model"):
        save_model(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_over_the_memory_budget_is_refused_before_loading(model_dir: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    recipe = Recipe.model_validate({"steps": [{"method": "quantize", "scheme": "w8a16"}]})
    inputs = PipelineInputs(model_dir=model_dir, memory_budget_bytes=100_000)
    from workers.compression.base import Callbacks

    with pytest.raises(EngineError, match=r"106,816 parameters: 0.00 GB in float32, .+ memory budget of 0.00 GB"):
        run_pipeline(recipe, inputs, tmp_path / "out", Callbacks(progress=lambda _f, message: stages.append(message)))
    assert stages == ["loading model"]
    assert not (tmp_path / "out").exists()


def test_loading_asks_should_stop_inside_transformers_and_stops_at_the_first_yes(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model construction and weight loading run inside from_pretrained; should_stop is asked from there (at
    every torch call here, with the interval at 0) and the first True ends the load."""
    import workers.compression.export as export

    monkeypatch.setattr(export, "STOP_CHECK_INTERVAL_S", 0.0)
    stop_on_the_tenth_question = StopAfter(10)
    with pytest.raises(StepCancelled, match="cancelled while loading the model"):
        load_model(model_dir, should_stop=stop_on_the_tenth_question)
    assert stop_on_the_tenth_question.asked == 10
    model, _ = load_model(model_dir, should_stop=lambda: False)  # and a load nobody stops completes
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 128)


def test_non_finite_float8_weights_are_seen_too() -> None:
    """float8 has no isfinite kernel; an FP8 checkpoint's NaN is found all the same."""
    from workers.compression.export import require_finite

    weights = torch.tensor([1.0, float("nan"), 448.0]).to(torch.float8_e4m3fn)
    require_finite([("ok", weights[[0, 2]])], "the model")
    with pytest.raises(EngineError, match=r"the model has non-finite weights: 1 NaN/inf values in 'w'"):
        require_finite([("w", weights)], "the model")


def test_a_config_far_larger_than_the_weights_is_refused_whatever_the_tensors_are_called(model_dir: Path) -> None:
    """Without 'model.layers.N' names to count, the config's least parameter count is held against the headers."""
    _rewrite_weights(model_dir, lambda t: t.update({k.replace("model.", "decoder.", 1): t.pop(k) for k in list(t)}))
    _edit_config(model_dir, num_hidden_layers=1_000_000)
    with pytest.raises(EngineError, match=r"num_hidden_layers 1000000\) describes at least 4,096,016,384 param"):
        inspect_model_dir(model_dir)


def test_a_config_without_architectures_loads_as_its_model_types_causal_lm(model_dir: Path) -> None:
    """A bare config (saved without a model) names no other class: transformers' causal LM for the model_type."""
    config = json.loads((model_dir / "config.json").read_text())
    del config["architectures"]
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = load_model(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
