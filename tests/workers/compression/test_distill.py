"""Distillation engine on tiny models: student kinds, the loss, padding, resume, DDP, cancel."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from app.jobs.spec import StudentSource
from tests.helpers import StopAfter
from tests.tiny import sample_text, tiny_model, tiny_tokenizer
from workers.compression.base import Callbacks, EngineError, StepCancelled
from workers.compression.data import tokenize_stream
from workers.compression.distill import (
    Trainee,
    as_blocks,
    build_student,
    distill,
    evenly_spaced_layers,
    latest_checkpoint,
    loss_sums,
)
from workers.compression.evaluate import MIN_PERPLEXITY_TOKENS
from workers.compression.recipe import DistillStep, StudentSpec

SMALL_STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
SMALL_STUDENT |= {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny matmuls: one thread is ~10x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    return tokenize_stream(tiny_tokenizer(), [sample_text(8)])


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return tiny_model("llama", seed=1, num_hidden_layers=4)


def step_config(**overrides: Any) -> DistillStep:
    values: dict[str, Any] = dict(
        student=StudentSpec(config=SMALL_STUDENT),
        max_steps=4,
        batch_size=4,
        seq_len=32,
        learning_rate=3e-3,
        warmup_steps=1,
        eval_every=1000,
        checkpoint_every=1000,
    )
    values.update(overrides)
    return DistillStep(**values)


class Recorder:
    """Collects metrics events; optionally asks to stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.stop_after = stop_after

    def callbacks(self) -> Callbacks:
        return Callbacks(metrics=self.events.append, should_stop=self.should_stop)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.events) >= self.stop_after

    def losses(self, key: str = "train_loss") -> list[float]:
        return [e[key] for e in self.events]


def run(teacher: nn.Module, config: DistillStep, stream: torch.Tensor, student: nn.Module | None = None, **kw: Any):
    recorder = kw.pop("recorder", None) or Recorder()
    student = student if student is not None else build_student(teacher, config.student, seed=3)
    outcome = distill(teacher, student, config, train_ids=stream, callbacks=recorder.callbacks(), **kw)
    return outcome, recorder


# ------------------------------------------------------------------------------------------ students


@pytest.mark.parametrize(
    "kind",
    [
        {"from_teacher": {"layers": [0, 3]}},
        {"from_teacher": {"keep_ratio": 0.5, "heads": 0.5, "mlp": 0.5}},
        {"config": SMALL_STUDENT},
        {"dir": True},
        {"previous_step": True},
    ],
    ids=["layers", "keep_ratio+heads+mlp", "config", "dir", "previous_step"],
)
def test_each_student_kind_builds_and_reloads(teacher: nn.Module, tmp_path: Path, kind: dict[str, Any]) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    previous = tiny_model("qwen2", seed=5)
    student_dir = None
    if kind.pop("dir", False):
        student_dir = tmp_path / "upload"
        tiny_model("qwen2", seed=6, num_hidden_layers=1).save_pretrained(student_dir)
        kind = {"upload_id": "up_1"}  # the service's student kind: the runner fetched it to student_dir
    spec = StudentSource(**kind) if student_dir else StudentSpec(**kind)
    student = build_student(teacher, spec, student_dir=student_dir, previous_model=previous)

    if "from_teacher" in kind:
        assert student is not teacher and student.config.num_hidden_layers == 2
    if "previous_step" in kind:
        assert student is previous
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "teacher was modified"
    student.save_pretrained(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


def test_from_teacher_layers_are_copied_from_the_teacher(teacher: nn.Module) -> None:
    student = build_student(teacher, StudentSpec(from_teacher={"layers": [1, 3]}))
    for s, t in ((0, 1), (1, 3)):
        assert torch.equal(student.model.layers[s].mlp.up_proj.weight, teacher.model.layers[t].mlp.up_proj.weight)
    assert evenly_spaced_layers(6, 3) == [0, 2, 5]  # round(2.5) is 2: halves round to even
    assert evenly_spaced_layers(4, 2) == [0, 3]


def test_vocabulary_mismatch_is_a_clear_error(teacher: nn.Module, stream: torch.Tensor) -> None:
    with pytest.raises(EngineError, match="vocabulary"):
        build_student(teacher, StudentSpec(config={**SMALL_STUDENT, "vocab_size": 300}))
    other = tiny_model("llama", vocab_size=300)
    with pytest.raises(EngineError, match="vocabulary"):
        build_student(teacher, StudentSpec(previous_step=True), previous_model=other)
    with pytest.raises(EngineError, match="vocabulary"):
        distill(teacher, other, step_config(), train_ids=stream)


def test_bad_student_specs_are_engine_errors(teacher: nn.Module) -> None:
    with pytest.raises(EngineError, match="model_type"):
        build_student(teacher, StudentSpec(config={"hidden_size": 32}))
    with pytest.raises(EngineError, match="out of range"):
        build_student(teacher, StudentSpec(from_teacher={"layers": [0, 9]}))
    with pytest.raises(EngineError, match="previous"):
        build_student(teacher, StudentSpec(previous_step=True))


def test_an_uploaded_student_is_loaded_as_safely_as_the_model(teacher: nn.Module, tmp_path: Path) -> None:
    """Pickle weights, custom code and oversized weights are refused for a student too (the student
    directory comes from a tenant's upload or s3:// prefix, just like the model)."""
    pickled = tmp_path / "pickled"
    teacher.config.save_pretrained(pickled)
    torch.save(teacher.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(EngineError, match="pickle weights are not accepted"):
        build_student(teacher, StudentSource(upload_id="upl_1"), student_dir=pickled)
    good = tmp_path / "good"
    teacher.save_pretrained(good)
    with pytest.raises(EngineError, match="over the limit of 1000"):
        build_student(teacher, StudentSource(upload_id="upl_1"), student_dir=good, max_bytes=1000)
    student = build_student(teacher, StudentSource(upload_id="upl_1"), student_dir=good)
    assert all(
        torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values(), strict=True)
    )


# ------------------------------------------------------------------------------------------ the loss


def test_kd_loss_is_zero_for_a_copy_of_the_teacher(teacher: nn.Module, stream: torch.Tensor) -> None:
    config = step_config(max_steps=1, kl_weight=1.0, ce_weight=0.0, temperature=2.0)
    _, rec = run(teacher, config, stream, student=copy.deepcopy(teacher))
    assert rec.events[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert rec.events[0]["ce_loss"] > 1.0  # the copy is not trivially perfect: KD really is the teacher gap
    # and a different student is not at zero
    _, rec = run(teacher, config, stream)
    assert rec.events[0]["kd_loss"] > 1e-3


def test_kd_term_matches_a_hand_computed_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ids, mask = torch.randint(0, 7, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.bool)
    _, kd, n = loss_sums(s, t, ids, mask, temperature=3.0)
    pt, ps = torch.softmax(t[:, :-1] / 3, -1), torch.softmax(s[:, :-1] / 3, -1)
    expected = 9 * (pt * (pt.log() - ps.log())).sum()
    assert kd is not None and n == 8
    torch.testing.assert_close(kd, expected)


def test_padding_is_masked_out_of_every_loss(teacher: nn.Module, stream: torch.Tensor) -> None:
    pad = 0
    rows = stream[: 8 * 24].view(8, 24)
    rows = torch.where(rows == pad, torch.ones_like(rows), rows)  # no pad id inside the real text
    padded = torch.cat([rows, torch.full((8, 8), pad)], dim=1)
    hs = {"layer_map": [[0, 1]], "weight": 0.5}
    config = step_config(max_steps=3, ce_weight=0.5, seq_len=24, hidden_states=hs)
    eval_rows = rows[:2]
    _, plain = run(teacher, config, rows, eval_ids=eval_rows, pad_token_id=pad)
    _, with_pad = run(teacher, config, padded, eval_ids=eval_rows, pad_token_id=pad)
    for key in ("train_loss", "kd_loss", "ce_loss", "hidden_loss"):
        torch.testing.assert_close(with_pad.losses(key), plain.losses(key), rtol=1e-4, atol=1e-5)
    assert with_pad.events[-1]["tokens"] == plain.events[-1]["tokens"] == 3 * 4 * 24


def test_right_padding_mask_keeps_eos_inside_rows() -> None:
    eos = 9
    rows = torch.tensor([[5, eos, 6, 7, eos, eos], [1, 2, 3, 4, 5, 6]])
    _, mask = as_blocks(rows, 6, pad_token_id=eos)
    assert mask.tolist() == [[True, True, True, True, False, False], [True] * 6]
    blocks, mask = as_blocks(torch.arange(20), 8, pad_token_id=eos)  # a stream: packed, never padded
    assert blocks.shape == (2, 8) and bool(mask.all())


def test_hidden_state_matching_with_width_mismatch_uses_a_projection(teacher: nn.Module, stream: torch.Tensor) -> None:
    student = build_student(teacher, StudentSpec(config=SMALL_STUDENT), seed=3)
    trainee = Trainee(student, [0], 32, 64)
    assert isinstance(trainee.projections[0], nn.Linear) and trainee.projections[0].weight.shape == (64, 32)
    assert isinstance(Trainee(student, [0], 32, 32).projections[0], nn.Identity)

    config = step_config(max_steps=25, kl_weight=0.0, hidden_states={"layer_map": [[0, 2]]}, learning_rate=1e-2)
    outcome, rec = run(teacher, config, stream, student=student)
    hidden = rec.losses("hidden_loss")
    assert rec.events[0]["kd_loss"] is None
    assert sum(hidden[-3:]) < 0.7 * sum(hidden[:3]), hidden
    assert outcome.facts["hidden_loss"] == hidden[-1]


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """Evaluation text long enough to report a perplexity from (MIN_PERPLEXITY_TOKENS)."""
    ids = tokenize_stream(tiny_tokenizer(), [sample_text(3)])
    assert ids.numel() >= MIN_PERPLEXITY_TOKENS + 32
    return ids


def test_loss_decreases_and_facts_are_reported(
    teacher: nn.Module, stream: torch.Tensor, held_out: torch.Tensor
) -> None:
    config = step_config(max_steps=30, ce_weight=0.5, eval_every=10)
    outcome, rec = run(teacher, config, stream, eval_ids=held_out)
    losses = rec.losses()
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert [e["step"] for e in rec.events] == list(range(1, 31))
    assert [e["step"] for e in rec.events if "eval_perplexity" in e] == [10, 20, 30]
    facts = outcome.facts
    assert facts["steps"] == 30 and facts["tokens"] == 30 * 4 * 32 and facts["resumed_from_step"] is None
    assert facts["eval_perplexity_after"] < facts["eval_perplexity_before"]
    assert facts["eval_perplexity_not_measured"] is None and facts["eval_tokens"] >= MIN_PERPLEXITY_TOKENS
    assert facts["student_params"] < facts["teacher_params"]
    assert facts["student_config"]["num_hidden_layers"] == 1
    assert rec.events[0]["lr"] < rec.events[1]["lr"]  # warmup, then cosine decay
    assert rec.events[-1]["lr"] < rec.events[1]["lr"]


def test_max_tokens_sets_the_number_of_steps(teacher: nn.Module, stream: torch.Tensor) -> None:
    config = step_config(max_steps=None, max_tokens=3 * 4 * 2 * 32, grad_accum=2)
    outcome, rec = run(teacher, config, stream)
    assert len(rec.events) == 3 and outcome.facts["tokens"] == 3 * 4 * 2 * 32


# ------------------------------------------------------------------------------------------ resume, cancel


def test_resume_from_checkpoint_gives_the_same_losses(teacher: nn.Module, stream: torch.Tensor, tmp_path: Path) -> None:
    student_cfg = {**SMALL_STUDENT, "attention_dropout": 0.2}  # dropout: the RNG state must be restored too
    config = step_config(student=StudentSpec(config=student_cfg), max_steps=6, checkpoint_every=3, grad_accum=2)
    _, straight = run(teacher, config, stream)

    handed: list[Path] = []
    with pytest.raises(StepCancelled):
        run(teacher, config, stream, checkpoint_dir=tmp_path, on_checkpoint=handed.append, recorder=Recorder(3))
    assert [p.name for p in handed] == ["step-00000003"]
    assert latest_checkpoint(tmp_path) == handed[0]
    assert {p.name for p in handed[0].iterdir()} >= {"model.safetensors", "trainer.pt", "rng-rank0.pt", "state.json"}

    outcome, resumed = run(teacher, config, stream, checkpoint_dir=tmp_path)  # a fresh student, same checkpoint
    assert outcome.facts["resumed_from_step"] == 3
    assert [e["step"] for e in resumed.events] == [4, 5, 6]
    assert resumed.losses() == pytest.approx(straight.losses()[3:], rel=1e-6)
    assert outcome.facts["tokens"] == straight.events[-1]["tokens"]


def test_resume_with_a_different_config_is_refused(teacher: nn.Module, stream: torch.Tensor, tmp_path: Path) -> None:
    config = step_config(max_steps=2, checkpoint_every=1)
    with pytest.raises(StepCancelled):
        run(teacher, config, stream, checkpoint_dir=tmp_path, recorder=Recorder(1))
    with pytest.raises(EngineError, match="learning_rate"):
        run(teacher, step_config(max_steps=2, checkpoint_every=1, learning_rate=1e-4), stream, checkpoint_dir=tmp_path)


def test_cancel_between_steps(teacher: nn.Module, stream: torch.Tensor) -> None:
    recorder = Recorder(stop_after=2)
    with pytest.raises(StepCancelled):
        run(teacher, step_config(max_steps=10), stream, recorder=recorder)
    assert len(recorder.events) == 2


def test_a_short_held_out_text_is_not_scored(teacher: nn.Module, stream: torch.Tensor) -> None:
    """5 % of this stream is a few hundred tokens: no perplexity is reported from it, and the facts say why."""
    config = step_config(max_steps=2, eval_every=1)
    outcome, rec = run(teacher, config, stream)
    facts = outcome.facts
    assert facts["eval_tokens"] < MIN_PERPLEXITY_TOKENS
    assert facts["teacher_eval_perplexity"] is None and facts["eval_perplexity_before"] is None
    assert facts["eval_perplexity_after"] is None
    assert facts["eval_perplexity_not_measured"] == (
        f"the held-out text has {facts['eval_tokens']:,} tokens, fewer than the 2,048 a perplexity is reported from"
    )
    assert not any("eval_perplexity" in e for e in rec.events)


def test_cancel_takes_effect_inside_the_held_out_perplexity_pass(
    teacher: nn.Module, stream: torch.Tensor, held_out: torch.Tensor
) -> None:
    """The teacher's held-out pass runs before the first step; a cancel stops it between two batches."""
    messages: list[str] = []
    callbacks = Callbacks(progress=lambda _f, m: messages.append(m), should_stop=StopAfter(3))
    config = step_config(max_steps=5)
    student = build_student(teacher, config.student, seed=3)
    with pytest.raises(StepCancelled):
        distill(teacher, student, config, train_ids=stream, eval_ids=held_out, callbacks=callbacks)
    batches = [m for m in messages if m.startswith("teacher held-out perplexity batch")]
    assert (
        len(batches) == 2
        and batches[0] == f"teacher held-out perplexity batch 1/{math.ceil(held_out.numel() // 32 / 4)}"
    )


def test_a_non_finite_loss_stops_training_at_the_first_step(teacher: nn.Module, stream: torch.Tensor) -> None:
    """A student with a NaN weight (as an infinite loss weight or a diverging learning rate would leave it): the
    step fails at the first optimizer step with the reason, instead of training on to a NaN model."""
    config = step_config(max_steps=50)
    student = build_student(teacher, config.student, seed=3)
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    recorder = Recorder()
    with pytest.raises(EngineError, match=r"the training loss is not finite \(nan\) at step 1: the student diverged"):
        distill(teacher, student, config, train_ids=stream, callbacks=recorder.callbacks())
    assert recorder.events == []  # not one step reported: it stopped at the first


# ------------------------------------------------------------------------------------------ data parallel


@pytest.mark.slow
def test_two_gloo_processes_match_one(teacher: nn.Module, stream: torch.Tensor) -> None:
    config = step_config(max_steps=4, ce_weight=0.5, grad_accum=2, hidden_states={"layer_map": [[0, 1]]})
    one, rec_one = run(teacher, config, stream)
    two, rec_two = run(teacher, config, stream, world_size=2)
    assert two.facts["world_size"] == 2
    for key in ("train_loss", "kd_loss", "ce_loss", "hidden_loss"):
        assert rec_two.losses(key) == pytest.approx(rec_one.losses(key), rel=1e-4)
    for (name, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_world_size_must_divide_the_batch(teacher: nn.Module, stream: torch.Tensor) -> None:
    with pytest.raises(EngineError, match="divisible"):
        run(teacher, step_config(batch_size=3), stream, world_size=2)


def test_building_a_student_of_a_million_layers_stops_on_cancel(
    teacher: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A student config is the user's: building its layers asks should_stop from inside transformers."""
    import workers.compression.export as export

    monkeypatch.setattr(export, "STOP_CHECK_INTERVAL_S", 0.0)
    stop_on_the_fifth_question = StopAfter(5)
    spec = StudentSpec(config={**SMALL_STUDENT, "num_hidden_layers": 1_000_000})
    with pytest.raises(StepCancelled):
        build_student(teacher, spec, should_stop=stop_on_the_fifth_question)
    assert stop_on_the_fifth_question.asked == 5
