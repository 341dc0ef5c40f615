"""The evaluation engine: measure one model the same way before and after a job.

``evaluate(model, tokenizer, eval_ids=...)`` returns an :class:`Evaluation` with

- **perplexity** on ``eval_ids``: a ``[n, seq_len]`` tensor of *non-overlapping* windows (see
  :func:`eval_windows`). Each window is scored on its own, with no context carried over from the
  previous one, so every window predicts ``seq_len - 1`` tokens; perplexity is
  ``exp(sum of token NLLs / number of predicted tokens)``. Windows run one at a time (batch 1) and the
  NLL is summed in float64 in a fixed order, so the same weights give bit-identical perplexity: an
  unchanged model scores exactly its baseline.
- **parameters** (logical count: a packed int4 weight counts its elements, not its int32 words) and a
  **dtype/bit-width mix** (``{"bfloat16": n, "int4": m, ...}``), read from compressed-tensors'
  ``module.quantization_scheme`` where present, else from ``config.quantization_config``.
- **size on disk**: the total bytes of every file under ``model_dir`` when given; otherwise the
  in-memory bytes of parameters and buffers (``size_method`` says which).
- **speed** at batch 1: prefill tokens/s (one forward over a ``prefill_tokens`` prompt) and decode
  tokens/s (greedy, with the KV cache, ``decode_tokens`` new tokens after the sample prompt). One
  warm-up run is discarded; the median of ``speed_runs`` timed runs is reported.
- **peak memory** during the speed and sample measurement: ``torch.cuda.max_memory_allocated`` on
  GPU (reset first); on CPU the process RSS, sampled by a background thread every few milliseconds
  with psutil (the maximum seen). CPU RSS covers the whole process — anything else the process holds
  counts too — so compare before/after figures from runs that hold the same other objects.
- a **sample**: the greedy continuation of a fixed prompt, a cheap "does it still talk" check.

Pure function over a torch model, like every engine: no DB, storage or Celery.
"""

from __future__ import annotations

import inspect
import math
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.utils.match import match_name
from torch import nn

from workers.compression.base import Callbacks, EngineError, device_of
from workers.compression.data import pack_blocks, tokenize_stream

DEFAULT_SAMPLE_PROMPT = "The most important thing to know about compression is"

MIN_PERPLEXITY_TOKENS = 2048
"""The fewest scored tokens a perplexity is reported from, as a result (the report's and a distill step's).

Below it the number says more about the few sentences scored than about the model: on 30 tokens a
compressed model read -0.03 % "better" than its original. With fewer tokens the report shows ``null`` and
says why (``evaluation.not_measured_reason``, a warning); 2,048 tokens is four windows of the default 512.
"""

# ---------------------------------------------------------------- evaluation text


def eval_windows(
    tokenizer: Any,
    text: str | Sequence[str],
    seq_len: int,
    max_tokens: int,
    *,
    skip_tokens: int = 0,
) -> torch.Tensor:
    """Evaluation windows ``[n, seq_len]``: the text tokenised as one EOS-separated stream, cut into
    non-overlapping windows, at most ``max_tokens`` tokens in all (the short tail is dropped).

    ``skip_tokens`` drops the start of the stream first: to score a *held-out* slice of calibration or
    training text, skip the tokens the step consumed (e.g. ``num_samples * seq_len`` for calibration).
    """
    texts = [text] if isinstance(text, str) else list(text)
    stream = tokenize_stream(tokenizer, texts)[skip_tokens:]
    if stream.numel() < seq_len:
        raise EngineError(
            f"evaluation text too short: {stream.numel()} tokens after skipping {skip_tokens}, "
            f"need at least one window of {seq_len}"
        )
    return pack_blocks(stream[:max_tokens], seq_len)


# ---------------------------------------------------------------- perplexity


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of ``targets`` ``[n]`` under ``logits`` ``[n, vocab]``.

    float32 log-softmax whatever the model dtype: bf16 logits would round the NLL visibly.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity_from(total_nll: float, tokens: int) -> float:
    """``exp(mean NLL)``; ``inf`` where exp would overflow (past ~709)."""
    mean = total_nll / tokens
    return math.exp(mean) if mean < 700 else math.inf


def _window_nll(model: nn.Module, window: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLLs over one window (float64) and how many tokens it predicted."""
    ids = window.unsqueeze(0).to(device_of(model))
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    nll = token_nll(logits, ids[0, 1:])
    return float(nll.double().sum().item()), int(nll.numel())


def perplexity(
    model: nn.Module,
    eval_ids: torch.Tensor,
    *,
    callbacks: Callbacks | None = None,
) -> float:
    """Perplexity over ``[n, seq_len]`` non-overlapping windows, each scored independently.

    Deterministic by construction: batch 1 (batched kernels may reduce in a shape-dependent order),
    float64 accumulation in window order. May be ``inf``/``nan`` for a broken model.
    """
    if eval_ids.dim() != 2 or eval_ids.shape[1] < 2 or eval_ids.shape[0] == 0:
        raise EngineError(f"eval_ids must be [n >= 1, seq_len >= 2], got {list(eval_ids.shape)}")
    callbacks = callbacks or Callbacks()
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode(), _eval_mode(model):
        for index, window in enumerate(eval_ids):
            callbacks.check()
            nll, tokens = _window_nll(model, window)
            total_nll += nll
            total_tokens += tokens
            callbacks.progress((index + 1) / eval_ids.shape[0], f"perplexity window {index + 1}/{eval_ids.shape[0]}")
    return perplexity_from(total_nll, total_tokens)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the measurement, then the caller's mode back (a distillation loop may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- parameters, dtypes, size


def _scheme_bits(scheme: Any) -> str | None:
    """'int4', 'float8', ... for a compressed-tensors QuantizationScheme (or its dict form) with weights."""
    weights = scheme.get("weights") if isinstance(scheme, dict) else getattr(scheme, "weights", None)
    if weights is None:
        return None
    get = weights.get if isinstance(weights, dict) else lambda key: getattr(weights, key, None)
    bits, kind = get("num_bits"), get("type")
    kind = getattr(kind, "value", kind) or "int"
    return f"{kind}{bits}" if bits is not None else None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A checkpoint's own ``targets``/``ignore`` names, read as compressed-tensors reads them (this is the
    format's rule, for checkpoints from any tool; a recipe's patterns go through ``ModuleMatcher``)."""
    return any(match_name(name, pattern) for pattern in patterns)


def _config_quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name → 'int4' etc. from ``config.quantization_config`` (compressed-tensors layout), for
    models whose modules carry no ``quantization_scheme`` attribute."""
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is None:
        return {}
    if not isinstance(qconfig, dict):
        to_dict = getattr(qconfig, "to_dict", None)
        qconfig = to_dict() if callable(to_dict) else vars(qconfig)
    # transformers' CompressedTensorsConfig nests the compressed-tensors dict one level down.
    qconfig = qconfig.get("quantization_config", qconfig) or qconfig
    groups = qconfig.get("config_groups") or {}
    ignore = list(qconfig.get("ignore") or [])
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or _matches(name, ignore):
            continue
        for group in groups.values():
            targets = list(group.get("targets") or [])
            if (
                type(module).__name__ in targets
                or _matches(name, targets)
                or ("Linear" in targets and hasattr(module, "weight_packed"))
            ):
                bits = _scheme_bits(group)
                if bits is not None:
                    found[name] = bits
                break
    return found


def _logical_weight_numel(module: nn.Module) -> int:
    """Elements of a quantized module's weight as the model sees it (packed int32 storage unpacked)."""
    shape = getattr(module, "weight_shape", None)
    if isinstance(shape, torch.Tensor) and shape.numel() >= 2:
        return int(torch.prod(shape.long()).item())
    in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features * out_features
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0


# Parameters compressed-tensors adds beside a quantized weight; they are metadata, not model weights.
_QUANT_AUX = re.compile(r"^(weight|input|output)_(scale|zero_point|g_idx|global_scale|shape|packed)$")


def count_parameters(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Logical parameter count and its split by storage kind.

    Quantized weights count under their bit width (``int4``, ``int8``, ``float8``) with their logical
    element count; every other parameter counts under its torch dtype (``bfloat16``...). Quantization
    metadata (scales, zero points, packed storage) is left out: it is overhead, visible in the size.
    Tied weights count once.
    """
    quantized: dict[str, str] = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        bits = _scheme_bits(scheme) if scheme is not None else None
        if bits is not None:
            quantized[name] = bits
    if not quantized:
        quantized = _config_quantized_modules(model)

    mix: dict[str, int] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        bits = quantized.get(module_name)
        if bits is not None:
            mix[bits] = mix.get(bits, 0) + _logical_weight_numel(module)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if bits is not None and (param_name == "weight" or _QUANT_AUX.match(param_name)):
                continue
            if bits is None and _QUANT_AUX.match(param_name) and hasattr(module, "weight_packed"):
                continue
            kind = str(param.dtype).removeprefix("torch.")
            mix[kind] = mix.get(kind, 0) + param.numel()
    return sum(mix.values()), dict(sorted(mix.items()))


def zero_fraction(model: nn.Module) -> float:
    """Share of exact zeros in the 2-D weights of Linear layers (unstructured sparsity shows here)."""
    zeros, total = 0, 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
                zeros += int((weight == 0).sum().item())
                total += weight.numel()
    return zeros / total if total else 0.0


def directory_size(path: Path) -> int:
    """Total bytes of every regular file under ``path`` (weights, config, tokenizer: what a user downloads)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def in_memory_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each tensor once (a proxy for size when there is no directory)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------- speed, memory, sample


class _PeakMemory:
    """Peak memory over a ``with`` block: CUDA ``max_memory_allocated``, or sampled CPU RSS.

    ``ru_maxrss`` would be simpler on CPU but it is a process-lifetime high-water mark: the result
    evaluation could never read lower than the baseline's. Sampling RSS gives the peak of *this* window.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_rss_sampled"

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(self.interval_s):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            import psutil

            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of ``fn()`` with the device queue drained on both sides (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, value


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``logits_to_keep=1`` where supported: a server computes only the last position's logits, and
    a full ``[seq, vocab]`` lm_head product would overstate prefill cost for large vocabularies."""
    return {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}


def _output_cache(out: Any) -> Any:
    # transformers 5.x renamed past_key_values to cache (the old name still warns until 5.40).
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Prefill ``prompt`` (untimed), then decode ``new_tokens`` greedily with the KV cache, one token a step.

    Returns the decode wall time and the generated ids. A hand loop rather than ``generate`` so that
    the timing holds decode steps only and never stops early at EOS.
    """
    device = prompt.device
    extra = _forward_kwargs(model)
    out = model(input_ids=prompt, use_cache=True, **extra)
    cache = _output_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    generated = [int(token.item())]
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"

    def steps() -> None:
        nonlocal cache, token
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{cache_kw: cache}, **extra)
            cache = _output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
            generated.append(int(token.item()))  # .item() syncs each step, as a real server would

    seconds, _ = _timed(device, steps)
    return seconds, generated


def _speed_prompt(eval_ids: torch.Tensor | None, prompt: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
    """A ``[1, length]`` prefill prompt: real text when there is some (from the eval windows), else
    the sample prompt repeated; token content barely matters for speed but real text keeps it honest."""
    if eval_ids is not None and eval_ids.numel() >= length:
        return eval_ids.reshape(-1)[:length].unsqueeze(0)
    base = prompt.reshape(-1) if prompt.numel() else torch.zeros(1, dtype=torch.long)
    return base.repeat(length // base.numel() + 1)[:length].clamp(max=vocab - 1).unsqueeze(0)


# ---------------------------------------------------------------- the engine


@dataclass
class Evaluation:
    """One model's measurements; ``to_dict()`` is the ``baseline``/``result`` object of report.json."""

    perplexity: float | None
    parameters: int
    size_bytes: int
    size_method: str  # "directory" | "in_memory"
    dtypes: dict[str, int]
    zero_fraction: float
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: int | None
    memory_method: str | None
    sample: str
    sample_prompt: str
    device: str
    eval_windows: int = 0
    eval_tokens: int = 0
    speed: dict[str, int] | None = None
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    eval_ids: torch.Tensor | None,
    model_dir: Path | None = None,
    measure_speed: bool = True,
    sample_prompt: str = DEFAULT_SAMPLE_PROMPT,
    sample_tokens: int = 32,
    prefill_tokens: int = 128,
    speed_runs: int = 3,
    callbacks: Callbacks | None = None,
) -> Evaluation:
    """Measure ``model``: perplexity on ``eval_ids`` (None: skipped), size, parameter mix, speed,
    peak memory and a greedy sample. Run it on the original and on the compressed model alike.

    ``model_dir`` is the saved model directory (size = bytes of its files); without it the size is the
    in-memory bytes of the tensors. ``sample_tokens`` is also the decode length timed for tokens/s;
    ``prefill_tokens`` the prompt length timed for prefill. ``speed_runs`` timed runs follow one
    discarded warm-up; the median is reported.
    """
    callbacks = callbacks or Callbacks()
    started = time.perf_counter()
    ppl = perplexity(model, eval_ids, callbacks=callbacks.scaled(0.0, 0.7)) if eval_ids is not None else None
    parameters, dtypes = count_parameters(model)
    callbacks.check()
    options = _RunOptions(measure_speed, sample_prompt, sample_tokens, prefill_tokens, speed_runs)
    run = _run_model(model, tokenizer, eval_ids, options, callbacks)
    callbacks.progress(1.0, "evaluation done")
    if model_dir is not None:
        size, size_method = directory_size(model_dir), "directory"
    else:
        size, size_method = in_memory_bytes(model), "in_memory"
    return Evaluation(
        perplexity=ppl,
        parameters=parameters,
        size_bytes=size,
        size_method=size_method,
        dtypes=dtypes,
        zero_fraction=zero_fraction(model),
        prefill_tokens_per_s=run.prefill_rate,
        decode_tokens_per_s=run.decode_rate,
        peak_memory_bytes=run.peak_memory,
        memory_method=run.memory_method,
        sample=run.sample,
        sample_prompt=sample_prompt,
        device=_describe_device(device_of(model)),
        eval_windows=int(eval_ids.shape[0]) if eval_ids is not None else 0,
        eval_tokens=int(eval_ids.numel()) if eval_ids is not None else 0,
        speed=run.speed,
        duration_s=time.perf_counter() - started,
    )


@dataclass
class _RunOptions:
    """How :func:`evaluate` runs the model: speed measured or not, the sample prompt and the lengths timed."""

    measure_speed: bool
    sample_prompt: str
    sample_tokens: int
    prefill_tokens: int
    speed_runs: int


@dataclass
class _RunResult:
    """What running the model measured: speeds (None when not measured), peak memory and the greedy sample."""

    prefill_rate: float | None
    decode_rate: float | None
    speed: dict[str, int] | None
    peak_memory: int
    memory_method: str
    sample: str


def _run_model(
    model: nn.Module, tokenizer: Any, eval_ids: torch.Tensor | None, options: _RunOptions, callbacks: Callbacks
) -> _RunResult:
    """Time prefill and decode (when asked) and take the greedy sample, under the peak-memory probe."""
    device = device_of(model)
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 2**31 - 1
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or 4096
    prompt = _sample_prompt(tokenizer, options.sample_prompt, device)
    # At least 2 new tokens: the first comes from the prefill, decode speed times the rest.
    sample_tokens = max(2, min(options.sample_tokens, max_positions - prompt.shape[1]))

    prefill_rate = decode_rate = None
    speed: dict[str, int] | None = None
    with torch.inference_mode(), _eval_mode(model), _PeakMemory(device) as memory:
        if options.measure_speed:
            length = max(1, min(options.prefill_tokens, max_positions))
            prefill_prompt = _speed_prompt(eval_ids, prompt, length, vocab).to(device)
            prefill_rate, decode_rate, generated = _timed_runs(
                model, prefill_prompt, prompt, sample_tokens, options.speed_runs, callbacks
            )
            speed = {
                "prefill_tokens": length,
                "decode_prompt_tokens": int(prompt.shape[1]),
                "decode_new_tokens": sample_tokens,
                "runs": options.speed_runs,
            }
        else:
            _, generated = _greedy_decode(model, prompt, sample_tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in generated:
        generated = generated[: generated.index(eos)]  # the sample is what a chat user would see
    sample = tokenizer.decode(generated, skip_special_tokens=True)
    return _RunResult(prefill_rate, decode_rate, speed, memory.peak, memory.method, sample)


def _sample_prompt(tokenizer: Any, text: str, device: torch.device) -> torch.Tensor:
    prompt = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    if prompt.numel() == 0:
        raise EngineError("sample prompt tokenises to nothing")
    return prompt.to(device)


def _timed_runs(
    model: nn.Module,
    prefill_prompt: torch.Tensor,
    prompt: torch.Tensor,
    sample_tokens: int,
    speed_runs: int,
    callbacks: Callbacks,
) -> tuple[float, float, list[int]]:
    """Median prefill and decode tokens/s over ``speed_runs`` timed runs after one discarded warm-up (kernels,
    allocator), and the greedy sample the last run generated."""
    device = device_of(model)
    prefill_times, decode_times = [], []
    generated: list[int] = []
    for run in range(speed_runs + 1):
        callbacks.check()
        seconds, _ = _timed(device, lambda: model(input_ids=prefill_prompt, use_cache=False, **_forward_kwargs(model)))
        decode_s, generated = _greedy_decode(model, prompt, sample_tokens)
        if run > 0:
            prefill_times.append(seconds)
            decode_times.append(decode_s)
        callbacks.progress(0.7 + 0.3 * (run + 1) / (speed_runs + 1), f"speed run {run + 1}/{speed_runs + 1}")
    prefill_rate = prefill_prompt.shape[1] / statistics.median(prefill_times)
    # The first new token comes from the prefill; the timed steps produce the other n - 1.
    decode_rate = max(sample_tokens - 1, 1) / max(statistics.median(decode_times), 1e-9)
    return prefill_rate, decode_rate, generated


def _describe_device(device: torch.device) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (8 threads)': enough to know what the speed numbers mean."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"
