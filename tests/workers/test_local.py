"""``modelpress compress``: the recipe behaves on the command line as it does through the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import sample_text, tiny_model, tiny_tokenizer, write_model_dir
from workers.compression.base import Callbacks, EngineError
from workers.compression.recipe import Recipe
from workers.local import compress_local
from workers.pipeline import PipelineInputs, run_pipeline


def _compress(tmp_path: Path, recipe: dict[str, Any], vocab: int | None = None, **options: Any) -> dict[str, Any]:
    model = tmp_path / "model"
    if vocab is None:
        write_model_dir(model)
    else:  # a tokenizer whose every id the model embeds (GGUF export checks that)
        tiny_model("llama", vocab_size=vocab).save_pretrained(model)
        tiny_tokenizer(vocab).save_pretrained(model)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    report = compress_local(model, tmp_path / "recipe.json", tmp_path / "out", **options)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report.model_dump(mode="json") == written  # the typed report is what report.json holds
    return written


def test_null_group_size_is_per_channel_and_no_speed_still_writes_a_report(tmp_path: Path) -> None:
    report = _compress(
        tmp_path,
        {"steps": [{"method": "quantize", "scheme": "w4a16", "group_size": None}]},
        measure_speed=False,
    )
    assert report["steps"][0]["details"]["group_size"] is None
    assert report["result"]["decode_tokens_per_s"] is None and report["summary"]["decode_speedup"] is None
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"][0]["details"]["group_size"] is None


@pytest.mark.slow
def test_calibration_file_without_a_calibration_block_uses_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "calib.txt").write_text(sample_text(40))
    report = _compress(
        tmp_path,
        {"steps": [{"method": "quantize", "scheme": "w4a16", "algorithm": "gptq"}]},
        calibration=tmp_path / "calib.txt",
        measure_speed=False,
    )
    assert report["steps"][0]["details"]["algorithm"] == "gptq"
    assert report["steps"][0]["details"]["group_size"] == 64  # 'auto' on widths 64 and 128


def test_a_calibrated_step_without_text_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"steps\[0\] \(quantize, algorithm gptq\) needs 'calibration' text"):
        _compress(tmp_path, {"steps": [{"method": "quantize", "scheme": "w4a16", "algorithm": "gptq"}]})


def test_a_group_size_that_fits_no_width_is_refused_before_the_baseline(tmp_path: Path) -> None:
    """The shape check runs before the model is measured, and names a size that works."""
    stages: list[str] = []
    recipe = Recipe.model_validate({"steps": [{"method": "quantize", "scheme": "w4a16", "group_size": 128}]})
    inputs = PipelineInputs(model_dir=write_model_dir(tmp_path / "model"))
    with pytest.raises(EngineError, match=r"group_size 128 does not divide the input width 64: use group_size 64"):
        run_pipeline(recipe, inputs, tmp_path / "out", Callbacks(progress=lambda _f, message: stages.append(message)))
    assert stages == ["loading model"]


@pytest.mark.slow
def test_the_readme_chained_recipe_runs(tmp_path: Path) -> None:
    """Structured pruning then default W4A16 GPTQ: 'auto' picks a group size the pruned widths allow."""
    (tmp_path / "calib.txt").write_text(sample_text(40))
    recipe = {
        "steps": [
            {"method": "prune", "algorithm": "structured", "targets": {"heads": 0.25, "mlp": 0.25}},
            {"method": "quantize", "scheme": "w4a16", "algorithm": "gptq"},
        ],
        "calibration": {"num_samples": 8, "seq_len": 64},
    }
    report = _compress(tmp_path, recipe, calibration=tmp_path / "calib.txt", measure_speed=False)
    assert [step["method"] for step in report["steps"]] == ["prune", "quantize"]
    assert report["steps"][1]["details"]["group_size"] == 32  # the pruned MLP is 96 wide


@pytest.mark.slow
def test_quantize_then_export_writes_a_gguf_measured_in_llama_cpp(tmp_path: Path) -> None:
    """An export step leaves model.gguf beside model/, and the report's headline speed is llama.cpp's: the
    GGUF against the same model exported F16, both run there."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the 'gguf' extra) is not installed")
    (tmp_path / "eval.txt").write_text(sample_text(30))
    report = _compress(
        tmp_path,
        {
            "steps": [{"method": "quantize", "scheme": "w4a16", "group_size": 32}, {"method": "export"}],
            "evaluation": {"seq_len": 64, "max_tokens": 2048},
        },
        vocab=512,
        evaluation=tmp_path / "eval.txt",
    )
    assert (tmp_path / "out" / "model.gguf").is_file() and (tmp_path / "out" / "model" / "config.json").is_file()
    export = report["steps"][1]
    assert export["method"] == "export" and export["details"]["type"] == "q4_0"
    llama = report["runtimes"]["llama.cpp"]
    assert llama["result"]["file_bytes"] == (tmp_path / "out" / "model.gguf").stat().st_size
    assert llama["baseline"]["file_bytes"] > llama["result"]["file_bytes"]  # F16 against Q4_0
    assert report["summary"]["speed_runtime"] == "llama.cpp"
    assert report["summary"]["decode_speedup"] == llama["decode_speedup"]["median"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.index("Results in llama.cpp") < card.index("Results in transformers")
    assert "llama-server -m ./model.gguf" in card


def test_an_export_that_cannot_carry_the_codes_is_refused_in_the_recipe(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"steps\[1\] \(export\): scheme fp8 cannot be stored losslessly"):
        _compress(tmp_path, {"steps": [{"method": "quantize", "scheme": "fp8"}, {"method": "export"}]})
    with pytest.raises(SystemExit, match=r"steps\[0\] \(export\) must be the last step"):
        _compress(tmp_path, {"steps": [{"method": "export"}, {"method": "quantize", "scheme": "w8a16"}]})
