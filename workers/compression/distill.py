"""Knowledge distillation: train a smaller student on a teacher's softened token distributions.

Two verbs, both pure (no DB, storage or Celery):

* :func:`build_student` makes the student a ``distill`` step names: cut from the teacher by the
  structured-pruning machinery, freshly initialised from a config, loaded from a directory, or the
  model the previous step produced.
* :func:`distill` trains it. The loop is meant to be read in one sitting (nanoGPT-like)::

      loss = kl_weight * T² * KL(teacher_T ‖ student_T) + ce_weight * CE(labels) + hs_weight * MSE(hidden)

  AdamW, linear warmup then cosine decay to 10 % of the peak rate, gradient clipping, gradient
  accumulation, bf16 autocast on CUDA only, the teacher in ``eval()`` under ``no_grad``.

Rules worth knowing:

* Every loss term is averaged over the same positions: those that predict a real next token (both the
  position and its target are inside the attention mask). Sums are divided by the count over the
  whole optimizer step, so grad accumulation, padding and data parallelism give the same gradient
  as one big batch.
* Data parallelism keeps the global batch: ``batch_size`` rows per micro-batch in total, each of the
  ``world_size`` ranks taking ``batch_size / world_size`` of them (must divide). Rank 0 runs in the
  calling process (so callbacks need not be picklable); ranks 1.. are spawned.
* Checkpoints are ``checkpoint_dir/step-NNNNNNNN/`` with ``model.safetensors`` (student + hidden-state
  projections), ``trainer.pt`` (optimizer + scheduler, torch.save of plain state dicts),
  ``rng-rank{r}.pt`` and ``state.json``. The batch order is a pure function of (seed, step), so the
  step is the data position. Only the newest checkpoint is kept locally; ``on_checkpoint`` gets each.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from workers.compression.base import Callbacks, EngineError, StepCancelled, StepOutcome, StopFn, device_of
from workers.compression.data import pack_blocks
from workers.compression.evaluate import MIN_PERPLEXITY_TOKENS, perplexity_from
from workers.compression.export import load_model, stop_checks
from workers.compression.layerwise import decoder_layers
from workers.compression.recipe import DistillStep, FromTeacher, StudentSpec

MIN_LR_RATIO = 0.1  # cosine decays to 10 % of the peak rate (nanoGPT's choice)
CHECKPOINT_PREFIX = "step-"
DIST_TIMEOUT = timedelta(minutes=30)

# ============================================================================ the student


def build_student(
    teacher: nn.Module,
    spec: StudentSpec,
    *,
    student_dir: Path | None = None,
    max_bytes: int | None = None,
    previous_model: nn.Module | None = None,
    calibration: torch.Tensor | None = None,
    seed: int = 0,
    should_stop: StopFn | None = None,
) -> nn.Module:
    """Make the student ``spec`` names. The teacher is never modified.

    ``student_dir`` is a student model the caller fetched (the service: the job's student upload or
    ``s3://`` model), used when ``spec`` names no way to make one, and loaded as the job's model is
    (safetensors only, no custom code, weights over ``max_bytes`` refused);
    ``previous_model`` the model earlier steps produced; ``calibration`` ([n, seq_len] ids) lets the
    pruning machinery rank heads/channels by activations instead of weight magnitude; ``seed`` fixes
    a fresh initialisation; ``should_stop`` is asked while a student is built or loaded. Raises
    :class:`EngineError` if the student's vocabulary differs.
    """
    if spec.from_teacher is not None:
        student = cut_from_teacher(teacher, spec.from_teacher, calibration=calibration)
    elif spec.config is not None:
        with stop_checks(should_stop):  # a config may ask for many layers: building them must stay cancellable
            student = fresh_from_config(teacher, spec.config, seed=seed)
    elif spec.previous_step:
        if previous_model is None:
            raise EngineError("student 'previous_step': no earlier step produced a model to distill into")
        student = previous_model
    else:
        if student_dir is None:
            raise EngineError("student model directory was not provided")
        student, _ = load_model(student_dir, max_bytes=max_bytes, should_stop=should_stop)
    check_same_vocabulary(teacher, student)
    return student


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``0..num_layers-1``, always including the first and the last
    (the embedding-adjacent and output-adjacent layers matter most for a cut-down student)."""
    if not 1 <= keep <= num_layers:
        raise EngineError(f"cannot keep {keep} of {num_layers} layers")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def teacher_layers_kept(
    teacher: nn.Module, spec: FromTeacher, *, calibration: torch.Tensor | None = None
) -> list[int] | None:
    """The teacher's decoder layers a ``from_teacher`` student keeps (``None``: all of them): the named
    ``layers``, or for ``keep_ratio`` the most important ones by ShortGPT block influence on the
    calibration blocks (evenly spaced without calibration)."""
    num_layers = len(decoder_layers(teacher))
    keep_layers: list[int] | None = None
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < num_layers]
        if bad:
            raise EngineError(f"student layers {bad} out of range: the teacher has {num_layers} layers")
        keep_layers = sorted(spec.layers)
    elif spec.keep_ratio is not None:
        keep = max(1, round(spec.keep_ratio * num_layers))
        if calibration is not None:
            from workers.compression.structured import layer_importance  # a sibling engine, heavy only when used

            scores = layer_importance(teacher, calibration)
            keep_layers = sorted(sorted(range(num_layers), key=lambda i: -scores[i])[:keep])
        else:
            keep_layers = evenly_spaced_layers(num_layers, keep)
    return None if keep_layers == list(range(num_layers)) else keep_layers


def cut_from_teacher(teacher: nn.Module, spec: FromTeacher, *, calibration: torch.Tensor | None = None) -> nn.Module:
    """Deep-copy the teacher and shrink the copy with the structured-pruning engine."""
    from workers.compression import structured  # imported late: a sibling engine, heavy only when used

    keep_layers = teacher_layers_kept(teacher, spec, calibration=calibration)
    if keep_layers is None and spec.heads is None and spec.mlp is None:
        raise EngineError("from_teacher keeps the whole teacher: name layers, keep_ratio < 1, heads or mlp")
    student = copy.deepcopy(teacher)
    structured.shrink(student, keep_layers=keep_layers, heads=spec.heads, mlp=spec.mlp, calibration=calibration)
    return student


def fresh_from_config(teacher: nn.Module, config: dict[str, Any], *, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM from a transformers config dict (no remote code).

    ``model_type`` is required; ``vocab_size`` and the special token ids default to the teacher's,
    because the student must speak the teacher's tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    if "auto_map" in values or values.pop("trust_remote_code", False):
        raise EngineError("student config must not use remote code ('auto_map')")
    model_type = values.pop("model_type", None)
    if not model_type:
        raise EngineError("student config needs 'model_type' (e.g. 'llama', 'qwen2')")
    for key in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        if key not in values and getattr(_config(teacher), key, None) is not None:
            values[key] = getattr(_config(teacher), key)
    try:
        cfg = AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, KeyError) as exc:
        raise EngineError(f"invalid student config: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
        except (ValueError, TypeError, KeyError) as exc:
            raise EngineError(f"cannot build a causal LM from the student config: {exc}") from exc
    return model.to(device_of(teacher))


def vocabulary_size(model: nn.Module) -> int:
    """Width of the model's logits (the output embedding rows), falling back to ``config.vocab_size``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(_config(model).vocab_size)


def check_same_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    """KD compares distributions token by token, so both models must share one vocabulary."""
    t, s = vocabulary_size(teacher), vocabulary_size(student)
    if t != s:
        raise EngineError(
            f"student vocabulary ({s} tokens) differs from the teacher's ({t}): "
            "distillation needs a student that uses the teacher's tokenizer"
        )


# ============================================================================ data


def as_blocks(ids: torch.Tensor, seq_len: int, pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training/eval rows ``[n, L]`` and their attention mask.

    A 1-D token stream is packed into ``seq_len`` blocks (the tail shorter than a block is dropped),
    so it has no padding. 2-D rows are used as given; with ``pad_token_id`` the trailing run of pad
    tokens of each row is right padding and masked out. Only the *trailing* run: many tokenizers use
    EOS as the pad token, and EOS between packed documents is real text.
    """
    if ids.dim() == 1:
        blocks = pack_blocks(ids, seq_len)
        return blocks, torch.ones_like(blocks, dtype=torch.bool)
    if ids.dim() != 2:
        raise EngineError(f"token ids must be a 1-D stream or 2-D rows, got shape {tuple(ids.shape)}")
    blocks = ids.long()
    if pad_token_id is None:
        return blocks, torch.ones_like(blocks, dtype=torch.bool)
    not_pad = blocks != pad_token_id
    # a position is real if any non-pad token sits at or after it in the row
    real_after = not_pad.flip(1).cumsum(1).flip(1) > 0
    return blocks, real_after


def _config(model: nn.Module) -> Any:
    """The transformers config of a model (typed loosely: any PretrainedConfig)."""
    return getattr(model, "config")  # noqa: B009 - nn.Module's attribute typing would reject .config


def _step_rows(step: int, rows_per_step: int, num_rows: int, seed: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """Row indices of optimizer step ``step``: a fresh seeded permutation per epoch over the rows.

    A pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
    On the CPU whatever the device: the seeded CPU generator gives one order everywhere, and the indices
    select rows of the host-side data.
    """
    positions = range(step * rows_per_step, (step + 1) * rows_per_step)
    out = []
    for pos in positions:
        epoch = pos // num_rows
        if epoch not in cache:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache.clear()  # one epoch at a time is enough: steps move forward
            cache[epoch] = torch.randperm(num_rows, generator=generator, device="cpu")
        out.append(int(cache[epoch][pos % num_rows]))
    return torch.tensor(out, dtype=torch.long, device="cpu")


# ============================================================================ the loss


def loss_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(ce_sum, kd_sum, n_positions)`` over positions that predict a real next token.

    ``kd_sum`` is T²·KL(teacher_T ‖ student_T) summed over positions (T² keeps gradient magnitudes
    comparable across temperatures, Hinton et al. 2015); None without teacher logits.
    """
    valid = (mask[:, :-1] & mask[:, 1:]).float()
    logits = student_logits[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none").view_as(valid)
    ce_sum = (ce * valid).sum()
    kd_sum = None
    if teacher_logits is not None:
        log_p_student = F.log_softmax(logits / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        kd_sum = temperature**2 * (kl * valid).sum()
    return ce_sum, kd_sum, valid.sum()


def hidden_sum(
    student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Mean-over-width squared error per position, averaged over the mapped layer pairs, summed over positions."""
    valid = (mask[:, :-1] & mask[:, 1:]).float()
    total = torch.zeros((), device=mask.device)
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        err = (s[:, :-1].float() - t[:, :-1].float()).pow(2).mean(-1)
        total = total + (err * valid).sum()
    return total / len(student_hidden)


@contextmanager
def capture_layer_outputs(model: nn.Module, layers: list[int]) -> Iterator[list[torch.Tensor]]:
    """Within the block, forward passes record the outputs of decoder layers ``layers`` (in that order)."""
    stack = decoder_layers(model)
    slots: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            slots[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [stack[i].register_forward_hook(make_hook(n)) for n, i in enumerate(layers)]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()
        out.extend(slots[n] for n in range(len(layers)) if n in slots)


class Trainee(nn.Module):
    """What the optimizer trains: the student plus one projection per hidden-state pair.

    A pair gets a learned ``Linear(student_width, teacher_width)`` when the widths differ and the
    identity otherwise. One module so DDP, the optimizer and checkpoints see a single thing.
    """

    def __init__(self, student: nn.Module, student_layers: list[int], student_width: int, teacher_width: int):
        super().__init__()
        self.student = student
        self.student_layers = student_layers
        # Initialised on the CPU from its seeded generator, so a projection starts the same on every device
        # (the caller moves the trainee to the student's device).
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False, device="cpu")
            if student_width != teacher_width
            else nn.Identity()
            for _ in student_layers
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.student_layers:
            return self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, []
        with capture_layer_outputs(self.student, self.student_layers) as hidden:
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, [proj(h) for proj, h in zip(self.projections, hidden, strict=True)]


# ============================================================================ the loop


def distill(
    teacher: nn.Module,
    student: nn.Module,
    config: DistillStep,
    *,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    checkpoint_dir: Path | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    world_size: int = 1,
    callbacks: Callbacks | None = None,
) -> StepOutcome:
    """Train ``student`` (in place) to imitate ``teacher`` under ``config``; return it with facts.

    ``train_ids``/``eval_ids``: a 1-D token stream (packed into ``config.seq_len`` blocks) or 2-D rows
    (see :func:`as_blocks` for padding). Without ``eval_ids`` the last ``eval_fraction`` of the
    training blocks is held out. With ``checkpoint_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and handed to ``on_checkpoint``; if the directory already holds one,
    training resumes from it exactly. ``world_size > 1`` trains data-parallel (DDP; gloo on CPU, one
    GPU per rank on CUDA). Raises :class:`StepCancelled` when ``callbacks.should_stop()`` turns true
    between steps, :class:`EngineError` for problems the user can fix.
    """
    callbacks = callbacks or Callbacks()
    check_same_vocabulary(teacher, student)
    train_blocks, train_mask = as_blocks(train_ids, config.seq_len, pad_token_id)
    if eval_ids is not None:
        eval_blocks, eval_mask = as_blocks(eval_ids, config.seq_len, pad_token_id)
    else:
        if train_blocks.shape[0] < 2:
            raise EngineError("training text too short: need at least two blocks (one is held out for evaluation)")
        n_eval = max(1, math.ceil(config.eval_fraction * train_blocks.shape[0]))
        eval_blocks, eval_mask = train_blocks[-n_eval:], train_mask[-n_eval:]
        train_blocks, train_mask = train_blocks[:-n_eval], train_mask[:-n_eval]
    if config.batch_size % world_size:
        raise EngineError(f"batch_size {config.batch_size} must be divisible by world_size {world_size}")
    if config.hidden_states is not None:
        _check_layer_map(teacher, student, config)
    job = _Job(teacher, student, config, _Data(train_blocks, train_mask, eval_blocks, eval_mask), checkpoint_dir)
    if world_size == 1:
        return _train(job, 0, 1, None, callbacks, on_checkpoint)
    return _train_data_parallel(job, world_size, callbacks, on_checkpoint)


def _check_layer_map(teacher: nn.Module, student: nn.Module, config: DistillStep) -> None:
    assert config.hidden_states is not None
    n_s, n_t = len(decoder_layers(student)), len(decoder_layers(teacher))
    for s, t in config.hidden_states.layer_map:
        if not (-n_s <= s < n_s and -n_t <= t < n_t):
            raise EngineError(f"hidden_states layer pair [{s}, {t}] out of range (student {n_s}, teacher {n_t} layers)")


class _Data(NamedTuple):
    """The packed token blocks every rank trains and is scored on (masks: 1 for a real token, 0 for padding)."""

    train_blocks: torch.Tensor
    train_mask: torch.Tensor
    eval_blocks: torch.Tensor
    eval_mask: torch.Tensor


@dataclass(frozen=True)
class _Job:
    """What every rank trains: the models, the step's config, the data, and where checkpoints go."""

    teacher: nn.Module
    student: nn.Module
    config: DistillStep
    data: _Data
    checkpoint_dir: Path | None


def _train_data_parallel(
    job: _Job, world_size: int, callbacks: Callbacks, on_checkpoint: Callable[[Path], None] | None
) -> StepOutcome:
    """Rank 0 here (callbacks stay in this process); ranks 1.. spawned; all join one process group."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise EngineError("a torch.distributed process group is already running in this process")
    teacher, student = job.teacher, job.student
    if device_of(teacher).type == "cuda" and torch.cuda.device_count() < world_size:
        raise EngineError(f"world_size {world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}")
    rendezvous = tempfile.mkdtemp(prefix="distill-ddp-")
    init_method = f"file://{rendezvous}/store"
    # children get CPU copies; tensors travel through shared memory, so each child clones its student
    cpu = torch.device("cpu")
    device = device_of(teacher)
    teacher.to(cpu)
    student.to(cpu)
    args = (world_size, init_method, job, device.type)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // world_size))  # ranks share the cores
    context = mp.start_processes(_rank_worker, args=args, nprocs=world_size - 1, join=False, start_method="spawn")
    teacher.to(device)
    student.to(device)
    finished = False
    try:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=world_size, timeout=DIST_TIMEOUT)
        outcome = _train(job, 0, world_size, dist, callbacks, on_checkpoint)
        finished = True
        return outcome
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        if finished:
            while not context.join():
                pass
        else:  # rank 0 failed or was cancelled: the others would wait on a collective forever
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        shutil.rmtree(rendezvous, ignore_errors=True)


def _rank_worker(index: int, world_size: int, init_method: str, job: _Job, device_type: str) -> None:
    """Entry point of a spawned rank (1..world_size-1)."""
    import torch.distributed as dist

    rank = index + 1
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    job = replace(job, student=copy.deepcopy(job.student))  # its tensors were shared with rank 0's (shared memory)
    job.teacher.to(device)
    job.student.to(device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=DIST_TIMEOUT)
    try:
        _train(job, rank, world_size, dist, Callbacks(), None)
    except StepCancelled:
        pass
    finally:
        dist.destroy_process_group()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to MIN_LR_RATIO at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def total_steps(config: DistillStep) -> int:
    """Optimizer steps to run: ``max_steps``, or enough nominal tokens (rows x seq_len) for ``max_tokens``."""
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    candidates = []
    if config.max_steps is not None:
        candidates.append(config.max_steps)
    if config.max_tokens is not None:
        candidates.append(max(1, math.ceil(config.max_tokens / tokens_per_step)))
    return min(candidates)


@dataclass
class _Training:
    """Everything one rank's training loop reads and updates (set up once by :func:`_setup`)."""

    rank: int
    world_size: int
    config: DistillStep
    teacher: nn.Module
    student: nn.Module
    trainee: Trainee
    model: Any  # the trainee, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: _Data
    dist: Any
    device: torch.device
    original_dtype: torch.dtype
    steps: int
    step: int = 0
    tokens: int = 0
    resumed_from: int | None = None
    teacher_ppl: float | None = None
    ppl_before: float | None = None
    eval_ppl: float | None = None
    last: dict[str, Any] = field(default_factory=dict)
    perm_cache: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> Any:
        """bf16 autocast on a GPU (fp32 master weights stay in the optimizer); nothing on a CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    @property
    def held_out_reason(self) -> str | None:
        """Why the held-out text is not scored (too few tokens to report a perplexity from), or None."""
        tokens = int(self.data.eval_mask.sum())
        if tokens >= MIN_PERPLEXITY_TOKENS:
            return None
        return (
            f"the held-out text has {tokens:,} tokens, fewer than the {MIN_PERPLEXITY_TOKENS:,} a perplexity is "
            "reported from"
        )

    def held_out_perplexity(self, model: nn.Module, callbacks: Callbacks, label: str) -> float | None:
        """Perplexity of ``model`` (the ``label``) on the held-out text, or None when it is too short to score.
        Progress stays at the current step's share; a cancel stops the pass between batches."""
        if self.held_out_reason is not None:
            return None
        fraction = self.step / self.steps

        def progress(_done: float, message: str) -> None:
            callbacks.progress(fraction, f"{label} {message}")

        phase = Callbacks(progress=progress, should_stop=callbacks.should_stop, metrics=callbacks.metrics)
        return perplexity(model, self.data.eval_blocks, self.data.eval_mask, self.config, phase)


def _train(
    job: _Job,
    rank: int,
    world_size: int,
    dist: Any,
    callbacks: Callbacks,
    on_checkpoint: Callable[[Path], None] | None,
) -> StepOutcome:
    """The training loop, run identically by every rank (rank 0 also evaluates, reports and checkpoints)."""
    run = _setup(job, rank, world_size, dist)
    teacher, student, config, checkpoint_dir = job.teacher, job.student, job.config, job.checkpoint_dir
    if run.is_main:
        if run.resumed_from is not None:
            callbacks.progress(run.step / run.steps, f"resumed from checkpoint step {run.step}")
        run.teacher_ppl = run.teacher_ppl or run.held_out_perplexity(teacher, callbacks, "teacher")
        run.ppl_before = run.ppl_before or run.held_out_perplexity(student, callbacks, "student")
    while run.step < run.steps:
        _check_stop(callbacks, dist, run.device)
        mean, lr = _optimizer_step(run)
        if not math.isfinite(mean[0]):  # every rank sees the same all-reduced loss, so every rank stops here
            raise EngineError(
                f"the training loss is not finite ({mean[0]}) at step {run.step}: the student diverged or holds "
                "non-finite weights; try a lower learning_rate"
            )
        if run.is_main:
            _report_step(run, mean, lr, callbacks)
        if checkpoint_dir is not None and run.step % config.checkpoint_every == 0 and run.step < run.steps:
            extra = {"teacher_eval_perplexity": run.teacher_ppl, "eval_perplexity_before": run.ppl_before}
            path = _save_checkpoint(checkpoint_dir, run, extra if run.is_main else {})
            if run.is_main and on_checkpoint is not None and path is not None:
                on_checkpoint(path)
    student.eval()
    student.to(dtype=run.original_dtype)
    if not run.is_main:
        return StepOutcome(model=student)
    if run.eval_ppl is None:  # resumed at the very end: nothing trained in this call
        run.eval_ppl = run.held_out_perplexity(student, callbacks, "student")
    return StepOutcome(model=student, facts=_facts(run))


def _setup(job: _Job, rank: int, world_size: int, dist: Any) -> _Training:
    """fp32 trainable student (+ hidden-state projections), AdamW with warmup + cosine, resumed from the
    newest checkpoint in the job's ``checkpoint_dir`` if there is one."""
    teacher, student, config, checkpoint_dir = job.teacher, job.student, job.config, job.checkpoint_dir
    device = device_of(teacher)
    original_dtype = next(student.parameters()).dtype
    student.to(device=device, dtype=torch.float32)  # fp32 master weights; autocast does the bf16 on GPU
    student.requires_grad_(True)
    teacher.eval()
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)

    s_layers = [s for s, _ in config.hidden_states.layer_map] if config.hidden_states else []
    trainee = Trainee(student, s_layers, _config(student).hidden_size, _config(teacher).hidden_size).to(device)
    model: Any = trainee
    if dist is not None:
        # logits go unused (lm_head gets no gradient) when only hidden states are matched
        unused = config.kl_weight == 0 and config.ce_weight == 0
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(trainee, device_ids=device_ids, find_unused_parameters=unused)

    decay = [p for p in trainee.parameters() if p.dim() >= 2]
    no_decay = [p for p in trainee.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    steps = total_steps(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup_steps, steps))
    run = _Training(
        rank, world_size, config, teacher, student, trainee, model, optimizer, scheduler, job.data, dist, device,
        original_dtype, steps,
    )  # fmt: skip
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if latest is not None:
        state = _load_checkpoint(latest, run)
        run.step, run.tokens, run.resumed_from = state["step"], state["tokens"], state["step"]
        run.teacher_ppl, run.ppl_before = state.get("teacher_eval_perplexity"), state.get("eval_perplexity_before")
    return run


def _optimizer_step(run: _Training) -> tuple[list[float], float]:
    """One optimizer step over ``batch_size x grad_accum`` rows (this rank's share of each micro-batch);
    returns the step's mean losses (total, kd, ce, hidden) over every rank and the learning rate used."""
    config, train_blocks, train_mask = run.config, run.data.train_blocks, run.data.train_mask
    rows = _step_rows(
        run.step, config.batch_size * config.grad_accum, train_blocks.shape[0], config.seed, run.perm_cache
    )
    step_mask = train_mask[rows]
    n_valid = (step_mask[:, :-1] & step_mask[:, 1:]).sum().clamp(min=1).item()
    sums = torch.zeros(4, device=run.device)  # total, kd, ce, hidden — this rank's share of the step
    rows_per_micro = config.batch_size // run.world_size
    run.trainee.train()
    for micro in range(config.grad_accum):
        chunk = rows[micro * config.batch_size : (micro + 1) * config.batch_size]
        mine = chunk[run.rank * rows_per_micro : (run.rank + 1) * rows_per_micro]
        sync = run.dist is None or micro == config.grad_accum - 1
        sums += _micro_batch(run, train_blocks[mine].to(run.device), train_mask[mine].to(run.device), n_valid, sync)
    torch.nn.utils.clip_grad_norm_(run.trainee.parameters(), config.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.dist is not None:
        run.dist.all_reduce(sums)
    run.step += 1
    run.tokens += int(step_mask.sum())
    return (sums / n_valid).tolist(), lr


def _micro_batch(run: _Training, ids: torch.Tensor, mask: torch.Tensor, n_valid: float, sync: bool) -> torch.Tensor:
    """Forward teacher and student on one micro-batch, backpropagate its share of the step's loss, and
    return its loss sums (total, kd, ce, hidden)."""
    config, hs = run.config, run.config.hidden_states
    t_logits, t_hidden = None, []
    if config.kl_weight > 0 or hs is not None:
        t_layers = [t for _, t in hs.layer_map] if hs else []
        with torch.no_grad(), run.autocast(), capture_layer_outputs(run.teacher, t_layers) as t_hidden:
            t_logits = run.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with nullcontext() if sync else run.model.no_sync(), run.autocast():
        s_logits, s_hidden = run.model(ids, mask)
        ce_sum, kd_sum, _ = loss_sums(
            s_logits, t_logits if config.kl_weight > 0 else None, ids, mask, config.temperature
        )
        loss = config.ce_weight * ce_sum
        if kd_sum is not None:
            loss = loss + config.kl_weight * kd_sum
        hid = hidden_sum(s_hidden, t_hidden, mask) if hs else torch.zeros((), device=run.device)
        if hs:
            loss = loss + hs.weight * hid
        # / n_valid of the whole step; times world_size undoes DDP's gradient averaging
        (loss * run.world_size / n_valid).backward()
    kd = kd_sum if kd_sum is not None else ce_sum * 0
    return torch.stack([loss.detach(), kd.detach(), ce_sum.detach(), hid.detach()])


def _report_step(run: _Training, mean: list[float], lr: float, callbacks: Callbacks) -> None:
    """Rank 0: the step's losses (+ held-out perplexity every ``eval_every`` steps) as progress and metrics."""
    config = run.config
    last: dict[str, Any] = {"step": run.step, "tokens": run.tokens, "train_loss": mean[0], "ce_loss": mean[2]}
    last["lr"] = lr
    last["kd_loss"] = mean[1] if config.kl_weight > 0 else None
    if run.resumed_from is not None and run.step == run.resumed_from + 1:
        last["resumed_from_step"] = run.resumed_from  # the first step event after a resume says so
    if config.hidden_states:
        last["hidden_loss"] = mean[3]
    if (run.step % config.eval_every == 0 or run.step == run.steps) and run.held_out_reason is None:
        run.eval_ppl = run.held_out_perplexity(run.student, callbacks, "student")
        last["eval_perplexity"] = run.eval_ppl
    run.last = last
    callbacks.progress(run.step / run.steps, f"step {run.step}/{run.steps} loss {mean[0]:.4f}")
    callbacks.metrics(dict(last))  # after progress: the runner's event carries this step's message


def _facts(run: _Training) -> dict[str, Any]:
    """What the report says about the distillation."""
    config, last = run.config, run.last
    return {
        "steps": run.step,
        "tokens": run.tokens,
        "resumed_from_step": run.resumed_from,
        "world_size": run.world_size,
        "global_batch_rows": config.batch_size * config.grad_accum,
        "train_loss": last.get("train_loss"),
        "kd_loss": last.get("kd_loss"),
        "ce_loss": last.get("ce_loss"),
        "hidden_loss": last.get("hidden_loss"),
        "teacher_eval_perplexity": run.teacher_ppl,
        "eval_perplexity_before": run.ppl_before,
        "eval_perplexity_after": run.eval_ppl,
        "eval_perplexity_not_measured": run.held_out_reason,
        "eval_tokens": int(run.data.eval_mask.sum()),
        "teacher_params": _count_params(run.teacher),
        "student_params": _count_params(run.student),
        "student_config": _config_summary(run.student),
        "teacher_config": _config_summary(run.teacher),
    }


def _check_stop(callbacks: Callbacks, dist: Any, device: torch.device) -> None:
    """Cancel between steps; with several ranks, rank 0 decides and tells the others."""
    if dist is None:
        callbacks.check()
        return
    flag = torch.tensor([1.0 if callbacks.should_stop() else 0.0], device=device)
    dist.broadcast(flag, src=0)
    if flag.item():
        raise StepCancelled("cancelled")


@torch.no_grad()
def perplexity(
    model: nn.Module, blocks: torch.Tensor, mask: torch.Tensor, config: DistillStep, callbacks: Callbacks | None = None
) -> float:
    """The report's definition of perplexity (:func:`workers.compression.evaluate.perplexity_from` of the
    summed next-token NLL over windows scored independently) on the step's held-out training text, batched
    and masked as training runs (bf16 autocast on CUDA); the model is left in eval mode. ``callbacks`` hear
    of every batch and may stop the pass between two."""
    callbacks = callbacks or Callbacks()
    model.eval()
    device = device_of(model)
    total, count = 0.0, 0.0
    batches = math.ceil(blocks.shape[0] / config.batch_size)
    for number, start in enumerate(range(0, blocks.shape[0], config.batch_size), start=1):
        callbacks.check()
        ids, m = (
            blocks[start : start + config.batch_size].to(device),
            mask[start : start + config.batch_size].to(device),
        )
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        with ctx:
            logits = model(input_ids=ids, attention_mask=m, use_cache=False).logits
        ce_sum, _, n = loss_sums(logits, None, ids, m, 1.0)
        total, count = total + float(ce_sum), count + float(n)
        callbacks.progress(number / batches, f"held-out perplexity batch {number}/{batches}")
    return perplexity_from(total, int(count)) if count else math.inf


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _config_summary(model: nn.Module) -> dict[str, Any]:
    cfg = _config(model)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    summary = {k: getattr(cfg, k, None) for k in (*keys, "num_key_value_heads", "vocab_size")}
    return summary


# ============================================================================ checkpoints

_RESUME_IGNORES = {"checkpoint_every", "eval_every"}  # may change between runs without changing the math


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    """The newest complete checkpoint under ``checkpoint_dir`` (one with ``state.json``), or None."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(config: DistillStep) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in _RESUME_IGNORES}


def _save_checkpoint(checkpoint_dir: Path, run: _Training, extra: dict[str, Any]) -> Path | None:
    """Write ``step-NNNNNNNN`` atomically (a temp dir renamed last); return it on rank 0."""
    from safetensors.torch import save_model

    rank, dist, step = run.rank, run.dist, run.step

    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = checkpoint_dir / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if dist is not None:
        dist.barrier()
    torch.save(_rng_state(), staging / f"rng-rank{rank}.pt")
    if dist is not None:
        dist.barrier()
    if rank != 0:
        return None
    save_model(run.trainee, str(staging / "model.safetensors"))
    trainer = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
    torch.save(trainer, staging / "trainer.pt")
    state = {"step": step, "tokens": run.tokens, "config": _comparable(run.config), **extra}
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):  # keep only the newest locally
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, run: _Training) -> dict[str, Any]:
    """Restore the trainee, optimizer, scheduler and this rank's RNG from ``path``; return its state.json."""
    from safetensors.torch import load_model

    config = run.config

    state = json.loads((path / "state.json").read_text())
    if state["config"] != _comparable(config):
        changed = sorted(k for k in state["config"] if state["config"][k] != _comparable(config).get(k))
        raise EngineError(f"checkpoint {path.name} was written with a different distill config ({', '.join(changed)})")
    device = device_of(run.trainee)
    load_model(run.trainee, str(path / "model.safetensors"), device=str(device))
    trainer = torch.load(path / "trainer.pt", map_location=device, weights_only=True)
    run.optimizer.load_state_dict(trainer["optimizer"])
    run.scheduler.load_state_dict(trainer["scheduler"])
    rng_file = path / f"rng-rank{run.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than wrote it: those start fresh
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
