"""report.json schema, summary arithmetic, chart, model card and files. Torch-free except one
end-to-end test that feeds real evaluations of a tiny model through the whole report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from workers.reporting import (
    CHART_SIZE_PX,
    REPORT_VERSION,
    UNSTRUCTURED_NOTE,
    EvaluationInfo,
    ModelMetrics,
    Report,
    StepRecord,
    Summary,
    build_report,
    model_card,
    render_chart,
    report_json_schema,
    summary_from_report,
    validate_report,
    write_report_files,
)

ROOT = Path(__file__).resolve().parents[2]


def metrics(**overrides: Any) -> dict[str, Any]:
    """An evaluation dict as evaluate().to_dict() produces it."""
    values: dict[str, Any] = {
        "perplexity": 8.0,
        "parameters": 1_000_000,
        "size_bytes": 4_000_000,
        "size_method": "directory",
        "dtypes": {"bfloat16": 1_000_000},
        "zero_fraction": 0.0,
        "prefill_tokens_per_s": 2000.0,
        "decode_tokens_per_s": 50.0,
        "peak_memory_bytes": 3_000_000_000,
        "memory_method": "cuda_max_memory_allocated",
        "sample": "Compression keeps the meaning.",
        "sample_prompt": "The most important thing",
        "device": "cuda (NVIDIA H100 80GB HBM3)",
        "eval_windows": 4,
        "eval_tokens": 2048,
        "speed": {"prefill_tokens": 128, "decode_prompt_tokens": 6, "decode_new_tokens": 32, "runs": 3},
        "duration_s": 1.5,
    }
    values.update(overrides)
    return values


QUANTIZE = {
    "method": "quantize",
    "params": {"scheme": "w4a16", "algorithm": "gptq", "group_size": 128},
    "duration_s": 12.5,
    "details": {"layers": 24},
}
EVAL_INFO = {"source": "evaluation", "seq_len": 512, "tokens": 2048, "windows": 4}


def as_json(report: Report) -> dict[str, Any]:
    """The report as written to report.json (what the chart, the model card and clients read)."""
    return report.model_dump(mode="json")


@pytest.fixture
def report() -> dict[str, Any]:
    """A built report in its written (JSON) form."""
    result = metrics(
        perplexity=8.4,
        size_bytes=1_000_000,
        dtypes={"int4": 900_000, "bfloat16": 100_000},
        prefill_tokens_per_s=3000.0,
        decode_tokens_per_s=125.0,
        peak_memory_bytes=1_500_000_000,
        sample="Compression keeps most of the meaning.",
    )
    return as_json(build_report(metrics(), result, [QUANTIZE], duration_s=42.0, evaluation_info=EVAL_INFO))


# ---------------------------------------------------------------- schema and summary


def test_build_report_has_the_documented_shape(report: dict[str, Any]) -> None:
    assert report["version"] == REPORT_VERSION
    required = {"perplexity", "parameters", "size_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_memory_bytes", "sample"}  # fmt: skip
    assert required <= set(report["baseline"]) and required <= set(report["result"])
    assert set(report["steps"][0]) >= {"method", "params", "duration_s", "details"}
    assert report["evaluation"]["source"] == "evaluation" and report["evaluation"]["seq_len"] == 512
    assert set(report["environment"]) >= {"device", "torch", "transformers"}
    assert report["environment"]["device"] == "cuda (NVIDIA H100 80GB HBM3)"
    assert report["duration_s"] == 42.0
    validate_report(report)
    # Strict JSON round trip: what is written is what clients read back.
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_summary_arithmetic(report: dict[str, Any]) -> None:
    summary = report["summary"]
    assert summary["size_ratio"] == pytest.approx(0.25)
    assert summary["perplexity_delta_pct"] == pytest.approx(5.0)
    assert summary["decode_speedup"] == pytest.approx(2.5)
    assert summary["prefill_speedup"] == pytest.approx(1.5)
    assert summary["parameters_ratio"] == pytest.approx(1.0)
    assert summary["memory_ratio"] == pytest.approx(0.5)


def test_summary_is_null_where_a_side_was_not_measured() -> None:
    unmeasured = metrics(perplexity=None, prefill_tokens_per_s=None, decode_tokens_per_s=None)
    report = build_report(
        unmeasured, unmeasured, [QUANTIZE], duration_s=1.0, evaluation_info={"source": "none", "seq_len": None,
                                                                              "tokens": 0}
    )  # fmt: skip
    assert report.summary.perplexity_delta_pct is None
    assert report.summary.decode_speedup is None and report.summary.prefill_speedup is None
    assert report.summary.size_ratio == 1.0
    assert any("not measured" in w for w in report.warnings)


def test_a_perplexity_not_measured_says_why_in_the_warnings_the_chart_and_the_card(tmp_path: Path) -> None:
    unmeasured = metrics(perplexity=None)
    reason = "the evaluation text gives 30 tokens to score, fewer than the 2,048 a perplexity is reported from"
    info = {"source": "none", "seq_len": None, "tokens": 0, "not_measured_reason": reason}
    report = build_report(unmeasured, unmeasured, [QUANTIZE], duration_s=1.0, evaluation_info=info)
    assert report.evaluation.not_measured_reason == reason
    assert report.warnings.count(f"Perplexity was not measured: {reason}.") == 1
    card = tmp_path / "README.md"
    write_report_files(report, tmp_path)
    assert f"Perplexity was not measured: {reason}." in card.read_text()


def test_validate_report_rejects_broken_reports(report: dict[str, Any]) -> None:
    for mutate in (
        lambda r: r.pop("baseline"),
        lambda r: r["result"].pop("parameters"),
        lambda r: r.update(version="one"),
        lambda r: r.update(steps=[]),
        lambda r: r["result"].update(size_bytes=-1),
        lambda r: r["steps"][0].pop("method"),
        lambda r: r["evaluation"].pop("source"),
    ):
        broken = json.loads(json.dumps(report))
        mutate(broken)
        with pytest.raises(ValidationError):
            validate_report(broken)
    assert issubclass(ValidationError, ValueError)  # callers may catch ValueError


def test_json_schema_validates_real_reports(report: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = report_json_schema()
    assert set(schema["required"]) >= {"version", "baseline", "result", "steps", "duration_s", "environment",
                                       "summary", "evaluation"}  # fmt: skip
    jsonschema.validate(report, schema)
    broken = json.loads(json.dumps(report))
    del broken["result"]["perplexity"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_non_finite_perplexity_becomes_null_with_a_warning() -> None:
    report = as_json(
        build_report(metrics(), metrics(perplexity=math.nan), [QUANTIZE], duration_s=1.0, evaluation_info=EVAL_INFO)
    )
    assert report["result"]["perplexity"] is None
    assert report["summary"]["perplexity_delta_pct"] is None
    assert any("not finite" in w and "compressed" in w for w in report["warnings"])
    json.dumps(report, allow_nan=False)


def test_unstructured_sparsity_is_flagged_and_structured_is_not() -> None:
    def warnings_for(params: dict[str, Any]) -> list[str]:
        step = {"method": "prune", "params": params, "duration_s": 1.0, "details": {}}
        return build_report(metrics(), metrics(), [step], duration_s=1.0, evaluation_info=EVAL_INFO).warnings

    assert UNSTRUCTURED_NOTE in warnings_for({"algorithm": "wanda", "sparsity": 0.5})
    assert UNSTRUCTURED_NOTE in warnings_for({"algorithm": "sparsegpt", "pattern": "2:4"})
    assert UNSTRUCTURED_NOTE not in warnings_for({"algorithm": "structured", "targets": {"layers": 0.25}})


def test_heldout_source_is_reported_as_such() -> None:
    info = {"source": "calibration_heldout", "seq_len": 512, "tokens": 1024}
    report = build_report(metrics(), metrics(), [QUANTIZE], duration_s=1.0, evaluation_info=info)
    assert any("held-out slice of the calibration text" in w for w in report.warnings)


def test_summary_from_report(report: dict[str, Any]) -> None:
    summary = summary_from_report(Report.model_validate(report))
    assert summary["size_ratio"] == pytest.approx(0.25)
    assert summary["baseline"]["size_bytes"] == 4_000_000 and summary["result"]["size_bytes"] == 1_000_000
    assert summary["result"]["perplexity"] == 8.4
    assert summary["evaluation_source"] == "evaluation" and summary["report_version"] == REPORT_VERSION


def test_docs_describe_every_field() -> None:
    """docs/report.md is the human schema; every field of the pydantic schema must appear in it."""
    doc = (ROOT / "docs" / "report.md").read_text(encoding="utf-8")
    assert f'"version": "{REPORT_VERSION}"' in doc
    models: list[type[BaseModel]] = [Report, ModelMetrics, Summary, StepRecord, EvaluationInfo]
    missing = [f"{m.__name__}.{f}" for m in models for f in m.model_fields if f"`{f}`" not in doc]
    assert not missing, f"undocumented report fields: {missing}"


def test_reporting_does_not_import_torch() -> None:
    """The runner stores summary_from_report's numbers and the CLI prints the report: neither needs torch here."""
    code = "import sys, workers.reporting; sys.exit('torch' in sys.modules or 'matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


# ---------------------------------------------------------------- chart


def test_chart_renders_a_png_of_the_documented_size(report: dict[str, Any], tmp_path: Path) -> None:
    from matplotlib import image

    path = render_chart(report, tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert (pixels.shape[1], pixels.shape[0]) == CHART_SIZE_PX
    assert pixels[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    # The compressed bars use the accent blue (#2f6fdf); find it so we know bars were drawn.
    blue = (abs(pixels[..., 0] - 0x2F / 255) < 0.02) & (abs(pixels[..., 2] - 0xDF / 255) < 0.02)
    assert blue.sum() > 1000


def test_chart_survives_missing_numbers(tmp_path: Path) -> None:
    unmeasured = metrics(perplexity=None, prefill_tokens_per_s=None, decode_tokens_per_s=None)
    report = build_report(
        unmeasured, unmeasured, [QUANTIZE], duration_s=1.0, evaluation_info={"source": "none", "seq_len": None,
                                                                              "tokens": 0}
    )  # fmt: skip
    path = render_chart(as_json(report), tmp_path / "nothing.png")
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------- model card and files


def test_model_card_states_the_numbers_and_how_to_load(report: dict[str, Any]) -> None:
    card = model_card(report, model_name="acme/tiny-chat", model_path="./model")
    assert card.startswith("---\nlibrary_name: transformers")
    assert "# acme/tiny-chat" in card
    for text in ("4.00 MB", "1.00 MB", "4.00x smaller", "8.00", "8.40", "+5.00 % (worse)", "2.50x faster",
                 "1.50x faster", "int4: 900.00K", "w4a16", "gptq", "2,048 tokens", "windows of 512"):  # fmt: skip
        assert text in card, text
    assert 'AutoModelForCausalLM.from_pretrained("./model"' in card
    assert "vllm serve ./model" in card and 'LLM(model="./model")' in card
    assert "compressed-tensors" in card  # int4 weights need the package in transformers
    assert "Compression keeps most of the meaning." in card
    assert UNSTRUCTURED_NOTE not in card


def test_model_card_warns_about_unstructured_sparsity() -> None:
    step = {"method": "prune", "params": {"algorithm": "magnitude", "sparsity": 0.5}, "duration_s": 1.0}
    report = build_report(metrics(), metrics(zero_fraction=0.5), [step], duration_s=1.0, evaluation_info=EVAL_INFO)
    card = model_card(as_json(report), model_name="m")
    assert "gives no speedup" in card
    assert "prune 50% (magnitude)" in card


def test_write_report_files(report: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report_files(Report.model_validate(report), tmp_path / "out", model_name="tiny")
    assert [p.name for p in paths] == ["report.json", "report.png", "README.md"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text()) == report
    assert validate_report(json.loads(paths[0].read_text())) == Report.model_validate(report)


def test_end_to_end_with_real_evaluations(tmp_path: Path) -> None:
    """A tiny model, evaluated, rounded to bf16, evaluated again: the report reflects both."""
    torch = pytest.importorskip("torch")
    from tests.tiny import sample_text, tiny_model, tiny_tokenizer
    from workers.compression.evaluate import eval_windows, evaluate

    tokenizer, model = tiny_tokenizer(), tiny_model()
    ids = eval_windows(tokenizer, sample_text(2), 32, 64)
    fast: dict[str, Any] = {"speed_runs": 1, "sample_tokens": 3, "prefill_tokens": 8}
    model.save_pretrained(tmp_path / "base")
    baseline = evaluate(model, tokenizer, eval_ids=ids, model_dir=tmp_path / "base", **fast)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "result")
    result = evaluate(model, tokenizer, eval_ids=ids, model_dir=tmp_path / "result", **fast)
    step = {"method": "quantize", "params": {"scheme": "w8a16"}, "duration_s": 0.1, "details": {}}
    info = {"source": "evaluation", "seq_len": 32, "tokens": int(ids.numel())}
    report = build_report(baseline, result, [step], duration_s=2.0, evaluation_info=info)
    assert report.summary.size_ratio == pytest.approx(0.5, abs=0.05)
    assert report.result.dtypes == {"bfloat16": baseline.parameters}
    assert report.summary.decode_speedup is not None and report.summary.decode_speedup > 0
    assert report.summary.prefill_speedup is not None and report.summary.prefill_speedup > 0
    card = write_report_files(report, tmp_path / "artifacts")[2].read_text()
    assert re.search(r"\| Perplexity \| [\d,.]+ \| [\d,.]+ \|", card)


def _llama_runtime(decode: tuple[float, float, float]) -> dict[str, Any]:
    def rates(value: float) -> dict[str, float]:
        return {"median": value, "min": value * 0.9, "max": value * 1.1}

    side = {
        "file_bytes": 1000,
        "perplexity": 9.0,
        **{k: rates(50.0) for k in ("prefill_tok_s", "decode_tok_s", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s")},
    }
    median, low, high = decode
    ratio = {"median": median, "min": low, "max": high, "significant": not low <= 1.0 <= high}
    return {
        "version": "0.3.36", "threads": 2, "batch": 1, "rounds": 5, "result": side, "baseline": {**side, "file_bytes": 4000},
        "size_ratio": 4.0, "perplexity_change": 0.01, "decode_speedup": ratio, "prefill_speedup": ratio,
        "decode_speedup_per_cpu_s": ratio, "prefill_speedup_per_cpu_s": ratio,
    }  # fmt: skip


def test_the_serving_runtime_is_the_headline_and_noise_is_flagged(tmp_path: Path) -> None:
    fast = build_report(
        metrics(), metrics(), [QUANTIZE], duration_s=1.0, evaluation_info=EVAL_INFO,
        runtimes={"llama.cpp": _llama_runtime((2.1, 1.9, 2.3))},
    )  # fmt: skip
    assert fast.summary.decode_speedup == 2.1 and fast.summary.speed_runtime == "llama.cpp"
    assert fast.summary.speedup_significant is True
    assert not any("noise" in w for w in fast.warnings)
    noisy = build_report(
        metrics(), metrics(), [QUANTIZE], duration_s=1.0, evaluation_info=EVAL_INFO,
        runtimes={"llama.cpp": _llama_runtime((1.05, 0.8, 1.3))},
    )  # fmt: skip
    assert noisy.summary.speedup_significant is False
    assert any("within this machine's noise" in w for w in noisy.warnings)
    card = model_card(as_json(noisy), model_name="m")
    assert "## Results in llama.cpp" in card and "(within noise)" in card
    plain = build_report(metrics(), metrics(), [QUANTIZE], duration_s=1.0, evaluation_info=EVAL_INFO)
    assert plain.summary.speed_runtime == "transformers" and plain.runtimes is None
