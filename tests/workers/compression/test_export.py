"""Safe loading and the one model writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.tiny import tiny_model, tiny_tokenizer, write_model_dir
from workers.compression.base import EngineError
from workers.compression.export import load_model, save_model


def test_dense_round_trip_float32(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src", "qwen2")
    model, tokenizer = load_model(src)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer is not None and tokenizer.eos_token == "<|endoftext|>"
    ids = torch.tensor([[1, 2, 3, 4]])
    save_model(model, tokenizer, tmp_path / "out")
    again, _ = load_model(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir() if p.suffix in (".safetensors", ".bin")) == [
        ".safetensors"
    ]


def test_sparse_model_keeps_its_zeros(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0.0
    save_model(model, tiny_tokenizer(), tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert bool((weights["model.layers.0.mlp.up_proj.weight"][:, ::2] == 0).all())


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "x.pkl"])
def test_pickle_weights_refused(tmp_path: Path, name: str) -> None:
    src = write_model_dir(tmp_path, "llama")
    (src / name).write_bytes(b"not really a pickle")
    with pytest.raises(EngineError, match="pickle weights are not accepted; convert to safetensors"):
        load_model(src)


def test_auto_map_refused(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path, "llama")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match="auto_map"):
        load_model(src)


def test_size_cap(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path, "llama")
    size = (src / "model.safetensors").stat().st_size
    with pytest.raises(EngineError, match="over the limit"):
        load_model(src, max_bytes=size - 1)
    model, _ = load_model(src, max_bytes=size)
    assert isinstance(model, nn.Module)


def test_missing_weights_and_config(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "a", "llama")
    (src / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="safetensors"):
        load_model(src)
    (src / "config.json").unlink()
    with pytest.raises(EngineError, match=r"config\.json"):
        load_model(src)
    with pytest.raises(EngineError, match="not found"):
        load_model(tmp_path / "nope")
