"""The job report: ``report.json`` (schema below, documented in docs/report.md), ``report.png`` (a
before/after chart) and ``README.md`` (a model card) for every job's artifacts.

Torch-free (the runner stores :func:`summary_from_report`'s headline numbers on the job row, which the API
shows); matplotlib is imported only inside :func:`render_chart`.

Schema versioning: ``version`` is ``"MAJOR.MINOR"``. Adding an optional field bumps MINOR; renaming,
removing or changing the meaning of a field bumps MAJOR. Readers should accept unknown fields.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

REPORT_VERSION = "1.1"
# report.png is drawn at exactly this size (no tight bbox), so viewers and tests can rely on it.
CHART_SIZE_PX = (1300, 460)  # (width, height)
CHART_DPI = 100
CHART_SIZE_IN = (CHART_SIZE_PX[0] / CHART_DPI, CHART_SIZE_PX[1] / CHART_DPI)

UNSTRUCTURED_NOTE = (
    "Unstructured sparsity (zeros scattered through dense weight matrices) gives no speedup and no size "
    "reduction in standard dense kernels, transformers or vLLM; only 2:4 patterns on sparse-capable GPUs "
    "or structured pruning make the model faster."
)


# ---------------------------------------------------------------- the schema


class _Schema(BaseModel):
    # Readers of a newer minor version must not choke on fields they do not know.
    model_config = ConfigDict(extra="allow")


class SpeedSettings(_Schema):
    """How the speed numbers were taken (batch 1)."""

    prefill_tokens: int = Field(description="prompt length timed for prefill")
    decode_prompt_tokens: int = Field(description="prompt length before decoding")
    decode_new_tokens: int = Field(description="greedy new tokens generated per decode run (KV cache)")
    runs: int = Field(description="timed runs after one discarded warm-up; the median is reported")


class ModelMetrics(_Schema):
    """One model's measurements (the original in ``baseline``, the compressed one in ``result``)."""

    perplexity: float | None = Field(description="on the evaluation windows; null if not measured or not finite")
    parameters: int = Field(ge=0, description="logical parameter count (quantized weights unpacked)")
    size_bytes: int | None = Field(ge=0, description="bytes of all files in the model directory (see size_method)")
    prefill_tokens_per_s: float | None = Field(description="batch-1 prompt processing throughput")
    decode_tokens_per_s: float | None = Field(description="batch-1 greedy generation throughput with KV cache")
    peak_memory_bytes: int | None = Field(description="peak memory during the speed/sample measurement")
    sample: str | None = Field(description="greedy continuation of sample_prompt")
    sample_prompt: str | None = None
    size_method: str | None = Field(default=None, description="'directory' (files on disk) or 'in_memory'")
    memory_method: str | None = Field(default=None, description="'cuda_max_memory_allocated' or 'cpu_rss_sampled'")
    dtypes: dict[str, int] = Field(default_factory=dict, description="parameter count by dtype / quantized bits")
    zero_fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="share of zeros in Linear weights")
    device: str | None = None
    eval_windows: int | None = None
    eval_tokens: int | None = None
    speed: SpeedSettings | None = None
    duration_s: float | None = Field(default=None, description="seconds this evaluation took")

    @field_validator("perplexity", "prefill_tokens_per_s", "decode_tokens_per_s", mode="before")
    @classmethod
    def _finite_or_null(cls, value: Any) -> Any:
        # NaN/inf are not JSON; a broken model's perplexity becomes null plus a report warning.
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value


class StepRecord(_Schema):
    """One pipeline step as it ran."""

    method: str = Field(description="'quantize', 'prune' or 'distill'")
    params: dict[str, Any] = Field(description="the step's spec as submitted (after defaults)")
    duration_s: float = Field(ge=0.0)
    details: dict[str, Any] = Field(default_factory=dict, description="facts the engine returned")


class Summary(_Schema):
    """Headline ratios; null where either side was not measured."""

    size_ratio: float | None = Field(description="result size / baseline size (0.25 = 4x smaller)")
    perplexity_delta_pct: float | None = Field(description="(result - baseline) / baseline * 100; + is worse")
    decode_speedup: float | None = Field(
        description="result decode tokens/s / baseline (>1 = faster), in the serving runtime named by speed_runtime"
    )
    prefill_speedup: float | None = Field(description="result prefill tokens/s / baseline (>1 = faster)")
    speed_runtime: str | None = Field(
        default=None,
        description="where the speed-ups were measured: 'llama.cpp' (the exported GGUF against the same model "
        "exported F16) or 'transformers' (eager PyTorch, where quantized weights run dequantized)",
    )
    speedup_significant: bool | None = Field(
        default=None,
        description="llama.cpp only: false when the per-round decode speed-ups straddle 1.0 (machine noise)",
    )
    parameters_ratio: float | None = Field(default=None, description="result parameters / baseline")
    memory_ratio: float | None = Field(default=None, description="result peak memory / baseline")


class EvaluationInfo(_Schema):
    """What the perplexity was measured on."""

    source: str = Field(description="'evaluation' | 'calibration_heldout' | 'training_heldout' | 'none'")
    seq_len: int | None = Field(description="window length in tokens")
    tokens: int = Field(ge=0, description="tokens scored (windows x seq_len)")
    windows: int | None = None
    not_measured_reason: str | None = Field(
        default=None, description="why perplexity is null on both sides, e.g. too little text to score (1.1)"
    )
    method: str = Field(
        default="non-overlapping windows of seq_len tokens, each scored independently; "
        "perplexity = exp(mean next-token NLL over the seq_len - 1 predicted tokens per window)",
    )


class Environment(_Schema):
    device: str = Field(description="where the measurements ran, e.g. 'cuda (NVIDIA H100 80GB HBM3)'")
    torch: str | None
    transformers: str | None
    compressed_tensors: str | None = None
    python: str | None = None


class Report(_Schema):
    """report.json."""

    version: str = Field(pattern=r"^\d+\.\d+$")
    created_at: str | None = Field(default=None, description="ISO 8601 UTC")
    baseline: ModelMetrics
    result: ModelMetrics
    summary: Summary
    steps: list[StepRecord] = Field(min_length=1)
    duration_s: float = Field(ge=0.0, description="whole job, seconds")
    evaluation: EvaluationInfo
    environment: Environment
    warnings: list[str] = Field(default_factory=list, description="things a reader should know about the numbers")
    runtimes: dict[str, Any] | None = Field(
        default=None,
        description="measurements in serving runtimes, by name: 'llama.cpp' for a GGUF export (size, perplexity "
        "from its own logits on the same windows, prefill/decode tokens/s at batch 1 with spreads and CPU time, "
        "paired speed-ups against the F16 export)",
    )


def report_json_schema() -> dict[str, Any]:
    """The JSON Schema of report.json (draft 2020-12, as pydantic emits it)."""
    return Report.model_json_schema()


def validate_report(report: Mapping[str, Any]) -> Report:
    """Check ``report`` against the schema; raises ``pydantic.ValidationError`` (a ``ValueError``)."""
    return Report.model_validate(dict(report))


# ---------------------------------------------------------------- building


def _as_dict(value: Any) -> dict[str, Any]:
    to_dict = getattr(value, "to_dict", None)
    return dict(to_dict() if callable(to_dict) else value)


def _ratio(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def has_unstructured_sparsity(steps: Sequence[Mapping[str, Any]]) -> bool:
    """True if any step pruned without structure (magnitude/Wanda/SparseGPT; N:M counts too: it only
    pays off on sparse-capable kernels)."""
    return any(
        s.get("method") == "prune" and (s.get("params") or {}).get("algorithm") not in (None, "structured")
        for s in steps
    )


def build_report(
    baseline: Any,
    result: Any,
    steps: Sequence[Mapping[str, Any]],
    *,
    duration_s: float,
    evaluation_info: Mapping[str, Any],
    environment: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    runtimes: Mapping[str, Any] | None = None,
) -> Report:
    """Assemble report.json as the typed :class:`Report`, validated here once (NaN measurements become null).

    ``baseline``/``result``: :class:`~workers.compression.evaluate.Evaluation` objects or their dicts.
    ``steps``: ``{"method", "params", "duration_s", "details"}`` per step. ``evaluation_info``:
    ``{"source", "seq_len", "tokens"}`` (+ optional ``windows``). ``environment`` overrides the
    detected package versions and device. ``notes`` are added to the warnings as they are. ``runtimes``: the
    serving-runtime measurements (``{"llama.cpp": ...}``); their speed-ups become the summary's headline.
    """
    base, res = _as_dict(baseline), _as_dict(result)
    info = dict(evaluation_info)
    env = {
        "device": res.get("device") or base.get("device") or "unknown",
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "compressed_tensors": _version("compressed-tensors"),
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    env.update(environment or {})
    draft = {
        "version": REPORT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "baseline": base,
        "result": res,
        "steps": [dict(s) for s in steps],
        "duration_s": duration_s,
        "evaluation": info,
        "environment": env,
        "warnings": [*notes, *_warnings(base, res, info, steps)],
        "summary": _EMPTY_SUMMARY,
        "runtimes": dict(runtimes) if runtimes else None,
    }
    # Validate first (NaN -> null happens here), then compute the summary from the clean numbers.
    report = Report.model_validate(draft)
    _summarize(report)
    return report


def _warnings(
    base: Mapping[str, Any], res: Mapping[str, Any], info: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]
) -> list[str]:
    """What a reader should know about these numbers."""
    warnings: list[str] = []
    for label, metrics in (("original", base), ("compressed", res)):
        value = metrics.get("perplexity")
        if isinstance(value, float) and not math.isfinite(value):
            warnings.append(f"The {label} model's perplexity is not finite ({value}): its outputs are broken.")
    if info.get("not_measured_reason"):
        warnings.append(f"Perplexity was not measured: {info['not_measured_reason']}.")
    elif info.get("source") == "none":
        warnings.append("No evaluation, calibration or training text was given: perplexity was not measured.")
    elif info.get("source") in ("calibration_heldout", "training_heldout"):
        kind = info["source"].split("_")[0]
        warnings.append(
            f"Perplexity was measured on a held-out slice of the {kind} text, not on a separate evaluation set."
        )
    if has_unstructured_sparsity(steps):
        warnings.append(UNSTRUCTURED_NOTE)
    if res.get("memory_method") == "cpu_rss_sampled":
        warnings.append(
            "Peak memory on CPU is the whole worker process's resident set (sampled), so it includes anything "
            "else the process held at the time; compare it with care."
        )
    return warnings


def _summarize(model: Report) -> None:
    """The headline ratios; the speed-ups from the serving runtime where one was measured."""
    b, r = model.baseline, model.result
    ppl_delta = None
    if b.perplexity is not None and r.perplexity is not None and b.perplexity > 0:
        ppl_delta = (r.perplexity - b.perplexity) / b.perplexity * 100.0
    model.summary = Summary(
        size_ratio=_ratio(r.size_bytes, b.size_bytes),
        perplexity_delta_pct=ppl_delta,
        decode_speedup=_ratio(r.decode_tokens_per_s, b.decode_tokens_per_s),
        prefill_speedup=_ratio(r.prefill_tokens_per_s, b.prefill_tokens_per_s),
        speed_runtime="transformers" if r.decode_tokens_per_s is not None else None,
        parameters_ratio=_ratio(r.parameters, b.parameters),
        memory_ratio=_ratio(r.peak_memory_bytes, b.peak_memory_bytes),
    )
    llama = (model.runtimes or {}).get("llama.cpp")
    if llama:
        # The number a user sees where they serve the model: the GGUF against the same model in F16, in llama.cpp.
        model.summary.decode_speedup = llama["decode_speedup"]["median"]
        model.summary.prefill_speedup = llama["prefill_speedup"]["median"]
        model.summary.speed_runtime = "llama.cpp"
        model.summary.speedup_significant = bool(llama["decode_speedup"]["significant"])
        if not model.summary.speedup_significant:
            model.warnings.append(
                "The llama.cpp decode speed-up is within this machine's noise (its per-round ratios straddle 1.0): "
                "not a measured difference."
            )


_EMPTY_SUMMARY = {"size_ratio": None, "perplexity_delta_pct": None, "decode_speedup": None, "prefill_speedup": None}


def summary_from_report(report: Report) -> dict[str, Any]:
    """The headline numbers for ``GET /v1/jobs/{id}`` (stored on the job row as JSON): the summary ratios plus
    the raw before/after values they came from, so a client can show "4.1 GB → 1.2 GB" without fetching
    report.json."""
    summary = report.summary.model_dump(mode="json")
    keys = {"perplexity", "size_bytes", "parameters", "decode_tokens_per_s", "prefill_tokens_per_s"}
    summary["baseline"] = report.baseline.model_dump(mode="json", include=keys)
    summary["result"] = report.result.model_dump(mode="json", include=keys)
    summary["evaluation_source"] = report.evaluation.source
    summary["report_version"] = report.version
    return summary


# ---------------------------------------------------------------- human formatting


def format_bytes(value: float | None) -> str:
    """'1.23 GB' (decimal units, as disks and Hugging Face show sizes)."""
    if value is None:
        return "n/a"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"  # unreachable; keeps type checkers content


def format_count(value: float | None) -> str:
    """'1.23B', '456.7M', '106.8K' parameters."""
    if value is None:
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _fmt_number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _change(kind: str, before: float | None, after: float | None) -> str:
    """A reader's phrase for the change: '3.70x smaller', '+2.1 % (worse)', '1.80x faster'."""
    if before is None or after is None or before == 0 or after == 0:
        return "n/a"
    if kind == "size":
        ratio = before / after
        return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    if kind == "speed":
        ratio = after / before
        return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    if kind == "lower_better":
        pct = (after - before) / before * 100
        if abs(pct) < 0.005:
            return "unchanged"
        return f"{pct:+.2f} % ({'worse' if pct > 0 else 'better'})"
    raise ValueError(kind)


def steps_line(report: Mapping[str, Any]) -> str:
    """'quantize w4a16 (gptq) → prune 2:4 (wanda)': the pipeline in one line."""
    parts = []
    for step in report.get("steps", []):
        params = step.get("params") or {}
        method = step.get("method", "?")
        if method == "quantize":
            parts.append(f"quantize {params.get('scheme', '')} ({params.get('algorithm', 'rtn')})")
        elif method == "prune":
            amount = params.get("pattern") or (
                f"{params['sparsity']:.0%}" if isinstance(params.get("sparsity"), int | float) else ""
            )
            if params.get("algorithm") == "structured":
                targets = params.get("targets") or {}
                amount = ", ".join(f"{k} {v:.0%}" for k, v in targets.items() if v)
            parts.append(f"prune {amount} ({params.get('algorithm', '')})".replace("  ", " "))
        else:
            parts.append(str(method))
    return " → ".join(parts) or "no steps"


# ---------------------------------------------------------------- chart


def _chart_panels(report: Mapping[str, Any]) -> list[tuple[str, str, str, Any, Any, float]]:
    """(title, unit, kind, before, after, scale) of each panel; the speeds are llama.cpp's where it measured."""
    base, res = report["baseline"], report["result"]
    # One unit for both size bars, picked from the larger so a 7B model reads "14.2 GB", not "14,200 MB".
    size_top = max(v for v in (base.get("size_bytes"), res.get("size_bytes"), 1) if v is not None)
    size_unit, size_scale = next((u, f) for u, f in (("GB", 1e-9), ("MB", 1e-6), ("kB", 1e-3)) if size_top * f >= 1)
    panels: list[tuple[str, str, str, Any, Any, float]] = [
        ("Size on disk", size_unit, "size", base.get("size_bytes"), res.get("size_bytes"), size_scale),
        ("Perplexity", "lower is better", "lower_better", base.get("perplexity"), res.get("perplexity"), 1.0),
        ("Prefill speed", "tokens/s", "speed", base.get("prefill_tokens_per_s"), res.get("prefill_tokens_per_s"), 1.0),
        ("Decode speed", "tokens/s", "speed", base.get("decode_tokens_per_s"), res.get("decode_tokens_per_s"), 1.0),
    ]
    llama = (report.get("runtimes") or {}).get("llama.cpp")
    if llama:  # the serving runtime's speeds: the GGUF against the F16 export, both in llama.cpp
        for index, key, name in ((2, "prefill_tok_s", "Prefill"), (3, "decode_tok_s", "Decode")):
            before, after = llama["baseline"][key]["median"], llama["result"][key]["median"]
            panels[index] = (f"{name} (llama.cpp)", "tokens/s", "speed", before, after, 1.0)
    return panels


def render_chart(report: Mapping[str, Any], path: Path, *, title: str | None = None) -> Path:
    """Draw report.png: four before/after panels (size, perplexity, prefill and decode speed), each
    bar labelled with its value and each panel titled with the change. Exactly :data:`CHART_SIZE_PX`."""
    import matplotlib

    matplotlib.use("Agg")  # headless workers; must precede pyplot
    from matplotlib import pyplot as plt

    panels = _chart_panels(report)
    colors = ("#9aa5b1", "#2f6fdf")  # grey = original, blue = compressed
    fig, axes = plt.subplots(1, len(panels), figsize=CHART_SIZE_IN, dpi=CHART_DPI)
    try:
        for ax, (name, unit, kind, before, after, scale) in zip(axes, panels, strict=True):
            change = _change(kind, before, after)
            ax.set_title(name, fontsize=13, fontweight="bold", pad=24)
            # The verdict under the title, green when the change helps, red when it hurts.
            ax.text(
                0.5,
                1.03,
                change,
                transform=ax.transAxes,
                ha="center",
                va="bottom",
                fontsize=11.5,
                color=_verdict_color(kind, before, after),
            )
            ax.set_ylabel(unit, fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
            values = [None if v is None else v * scale for v in (before, after)]
            heights = [v if v is not None else 0.0 for v in values]
            bars = ax.bar(["Original", "Compressed"], heights, color=colors, width=0.6)
            ax.tick_params(axis="x", labelsize=11)
            top = max(heights) if max(heights) > 0 else 1.0
            ax.set_ylim(0, top * 1.2)  # head room for the value labels
            for bar, value in zip(bars, values, strict=True):
                label = "not measured" if value is None else _short(value)
                if value is not None and kind == "size":
                    label += f" {unit}"
                ax.annotate(
                    label,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=11,
                    color="#888888" if value is None else "black",
                )
        evaluation = report.get("evaluation") or {}
        env = report.get("environment") or {}
        runs = (report["result"].get("speed") or {}).get("runs")
        fig.suptitle(title or f"ModelPress: {steps_line(report)}", fontsize=14, fontweight="bold")
        if not evaluation.get("tokens"):
            why = "too little text" if evaluation.get("not_measured_reason") else "no text given"
            ppl_note = f"Perplexity: not measured ({why})."
        else:
            ppl_note = (
                f"Perplexity: {evaluation.get('source', '?')} text, {evaluation.get('tokens', 0):,} tokens "
                f"in windows of {evaluation.get('seq_len', '?')}."
            )
        llama = (report.get("runtimes") or {}).get("llama.cpp")
        speed_note = (
            f"Speed: llama.cpp, batch 1, {llama['threads']} threads, the GGUF against the F16 export, median of "
            f"{llama['rounds']} interleaved rounds."
            if llama
            else f"Speed: batch 1 on {env.get('device', '?')}, median of {runs if runs else 'several'} runs after a "
            "warm-up."
        )
        footnote = f"{ppl_note}   {speed_note}"
        fig.text(0.5, 0.02, footnote, ha="center", fontsize=9.5, color="#555555")
        fig.subplots_adjust(left=0.05, right=0.99, top=0.76, bottom=0.14, wspace=0.38)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=CHART_DPI, format="png")
    finally:
        plt.close(fig)
    return path


def _verdict_color(kind: str, before: float | None, after: float | None) -> str:
    """Green if the change is an improvement, red if a regression, grey if none or unknown."""
    if before is None or after is None or before == after:
        return "#666666"
    better = after > before if kind == "speed" else after < before
    return "#1a7f37" if better else "#cf222e"


def _short(value: float) -> str:
    """Bar label: 3 significant digits, thousands separated."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# ---------------------------------------------------------------- model card


def model_card(report: Mapping[str, Any], *, model_name: str, model_path: str = "./model") -> str:
    """README.md for the compressed model: what was done, the numbers (the serving runtime's first), how to run it.

    ``model_path`` is the model directory as a reader of this README should write it: the default
    ``./model`` matches the artifact layout (README.md beside ``model/``, ``model.gguf`` beside both); pass
    ``"."`` for a README placed inside the model directory.
    """
    base, res = report["baseline"], report["result"]
    env = report.get("environment") or {}
    exported = any(s.get("method") == "export" for s in report.get("steps", []))
    parent = model_path.rstrip("/").rsplit("/", 1)[0] if "/" in model_path else "."
    gguf_path = "../model.gguf" if model_path == "." else f"{parent}/model.gguf"
    step_lines = []
    for index, step in enumerate(report.get("steps", []), start=1):
        params = json.dumps(step.get("params") or {}, sort_keys=True)
        step_lines.append(f"{index}. **{step.get('method')}** ({step.get('duration_s', 0):.1f} s): `{params}`")
    mix = ", ".join(f"{kind}: {format_count(n)}" for kind, n in (res.get("dtypes") or {}).items()) or "n/a"
    tags = ["modelpress", "compressed", *sorted({str(s.get("method")) for s in report.get("steps", [])})]
    lines = [
        "---", "library_name: transformers", "tags:", *[f"- {tag}" for tag in tags], "---", "",
        f"# {model_name} (compressed by ModelPress)", "",
        f"**Pipeline:** {steps_line(report)}", "",
        "## What was done", "", *step_lines, "",
        f"Total job time: {report.get('duration_s', 0):.1f} s.", "",
        *_runtime_lines(report),
        "## Results in transformers" if exported else "## Results", "",
        *_results_table(base, res), "",
        f"Parameter mix after compression: {mix}.", "",
        *_method_lines(report),
        "### Sample (greedy)", "",
        f"Prompt: `{base.get('sample_prompt') or res.get('sample_prompt') or ''}`", "",
        f"- Original: {_quote(base.get('sample'))}",
        f"- Compressed: {_quote(res.get('sample'))}", "",
        *_usage_lines(model_path, gguf_path if exported else None),
    ]  # fmt: skip
    notes = list(report.get("warnings") or [])
    if _is_quantized(res):
        notes.append(
            "The weights are stored in the compressed-tensors format: transformers needs "
            "`pip install compressed-tensors` to load them; vLLM reads the format natively."
        )
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    lines += [
        "## Environment",
        "",
        f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
        f"report schema {report.get('version', '?')}.",
        "",
    ]
    return "\n".join(lines)


def _is_quantized(metrics: Mapping[str, Any]) -> bool:
    kinds = metrics.get("dtypes") or {}
    return any(not kind.startswith(("float", "bfloat")) or kind.startswith("float8") for kind in kinds)


def _results_table(base: Mapping[str, Any], res: Mapping[str, Any]) -> list[str]:
    # (label, report key, formatter, how to phrase the change; None = plain percentage)
    rows: list[tuple[str, str, Any, str | None]] = [
        ("Size on disk", "size_bytes", format_bytes, "size"),
        ("Parameters", "parameters", format_count, None),
        ("Perplexity", "perplexity", _fmt_number, "lower_better"),
        ("Prefill (tokens/s)", "prefill_tokens_per_s", lambda v: _fmt_number(v, 1), "speed"),
        ("Decode (tokens/s)", "decode_tokens_per_s", lambda v: _fmt_number(v, 1), "speed"),
        ("Peak memory", "peak_memory_bytes", format_bytes, None),
    ]
    table = ["| Metric | Original | Compressed | Change |", "|---|---:|---:|---|"]
    for label, key, fmt, kind in rows:
        before, after = base.get(key), res.get(key)
        change = _change(kind, before, after) if kind else _pct_change(before, after)
        table.append(f"| {label} | {fmt(before)} | {fmt(after)} | {change} |")
    return table


def _runtime_lines(report: Mapping[str, Any]) -> list[str]:
    """The serving runtime's numbers, first: the GGUF against the same model exported F16, both in llama.cpp."""
    llama = (report.get("runtimes") or {}).get("llama.cpp")
    if not llama:
        return []
    base, res = llama["baseline"], llama["result"]

    def speed(side: Mapping[str, Any], key: str) -> str:
        value = side[key]
        return f"{value['median']:.1f} ({value['min']:.1f}-{value['max']:.1f})"

    def ratio(value: Mapping[str, Any]) -> str:
        flag = "" if value.get("significant") else " (within noise)"
        return f"x{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f}){flag}"

    return [
        "## Results in llama.cpp (where this GGUF runs)",
        "",
        "| Metric | F16 export | model.gguf | Change |",
        "|---|---:|---:|---|",
        f"| File size | {format_bytes(base['file_bytes'])} | {format_bytes(res['file_bytes'])} | "
        f"{llama['size_ratio']:.2f}x smaller |",
        f"| Perplexity | {_fmt_number(base['perplexity'])} | {_fmt_number(res['perplexity'])} | "
        f"{_pct_change(base['perplexity'], res['perplexity'])} |",
        f"| Prefill (tokens/s) | {speed(base, 'prefill_tok_s')} | {speed(res, 'prefill_tok_s')} | "
        f"{ratio(llama['prefill_speedup'])} |",
        f"| Decode (tokens/s) | {speed(base, 'decode_tok_s')} | {speed(res, 'decode_tok_s')} | "
        f"{ratio(llama['decode_speedup'])} |",
        "",
        f"llama.cpp {llama.get('version') or ''} at batch 1 on {llama['threads']} threads: the two files timed in the "
        f"same {llama['rounds']} rounds, order alternating; medians with (min-max) over rounds, speed-ups the median "
        f"of per-round ratios (per CPU-second: decode x{llama['decode_speedup_per_cpu_s']['median']:.2f}). "
        "Perplexity from llama.cpp's own logits on the same windows as below.",
        "",
    ]


def _method_lines(report: Mapping[str, Any]) -> list[str]:
    evaluation, env = report.get("evaluation") or {}, report.get("environment") or {}
    if evaluation.get("tokens"):
        scored = (
            f"Perplexity was measured on **{evaluation.get('source', '?')}** text: {evaluation['tokens']:,} tokens "
            f"in non-overlapping windows of {evaluation.get('seq_len', '?')} tokens, each scored independently."
        )
    else:
        scored = f"Perplexity was not measured: {evaluation.get('not_measured_reason') or 'no text was given'}."
    return [
        f"{scored} Speed is batch 1 "
        f"on {env.get('device', '?')} in eager PyTorch (quantized weights run dequantized there): prefill over a "
        "prompt, decode as greedy generation with the KV cache; one warm-up, median of the timed runs. See "
        "`report.json` for every number and `report.png` for a chart.",
        "",
    ]


def _usage_lines(model_path: str, gguf_path: str | None) -> list[str]:
    lines = [
        "## How to use", "",
        "transformers:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_path}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_path}")',
        'inputs = tokenizer("Hello, my name is", return_tensors="pt").to(model.device)',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```", "",
        "vLLM (server, OpenAI-compatible API):", "",
        "```bash", f"vllm serve {model_path}", "```", "",
        "vLLM (offline):", "",
        "```python", "from vllm import LLM", "",
        f'llm = LLM(model="{model_path}")',
        'print(llm.generate("Hello, my name is")[0].outputs[0].text)',
        "```", "",
    ]  # fmt: skip
    if gguf_path:
        lines += [
            "llama.cpp (the GGUF file carries the tokenizer and chat template):", "",
            "```bash",
            f'llama-cli -m {gguf_path} -p "Hello, my name is" -n 32',
            f"llama-server -m {gguf_path} --port 8080   # OpenAI-compatible API",
            "```", "",
        ]  # fmt: skip
    return lines


def _pct_change(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "n/a"
    pct = (after - before) / before * 100
    return "unchanged" if pct == 0 else f"{pct:+.1f} %"


def _quote(text: str | None) -> str:
    if text is None:
        return "_(not generated)_"
    # One line, code-quoted: samples of a damaged model are often control characters or markdown.
    flat = " ".join(text.split()).replace("`", "'")
    return f"`{flat}`" if flat else "_(empty)_"


# ---------------------------------------------------------------- files


def write_report_files(
    report: Report, out_dir: Path, *, model_name: str = "model", model_path: str = "./model"
) -> list[Path]:
    """Write report.json, report.png and README.md into ``out_dir``. ``report`` is serialised here, once: the
    chart and the model card are drawn from the very JSON written to report.json."""
    document = report.model_dump(mode="json")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    # allow_nan=False: the file must be strict JSON for every client (validation already nulled NaN).
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    chart_path = render_chart(document, out_dir / "report.png")
    card_path = out_dir / "README.md"
    card_path.write_text(model_card(document, model_name=model_name, model_path=model_path), encoding="utf-8")
    return [json_path, chart_path, card_path]
