"""The layer loop: the staged (group by group) forward, and the allocator policy it runs under."""

from __future__ import annotations

import resource
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tests.tiny import tiny_model
from workers.compression import heap
from workers.compression.base import set_weight
from workers.compression.layerwise import (
    ATTENTION_IN,
    ATTENTION_OUT,
    MLP_IN,
    MLP_OUT,
    LayerBatch,
    capture_layer_inputs,
    decoder_layers,
    layerwise,
    run_layer,
    staged_forward,
    stages_match,
)


def _batches(model: nn.Module, seed: int = 0) -> list[LayerBatch]:
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(seed))
    return capture_layer_inputs(model, ids, 2)


def _copy(batches: list[LayerBatch]) -> list[LayerBatch]:
    return [LayerBatch(hidden=b.hidden.clone(), kwargs=b.kwargs) for b in batches]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("store_bytes", [1 << 30, 0])
def test_staged_forward_computes_the_layer_and_shows_each_group_its_input(arch: str, store_bytes: int) -> None:
    """With nothing changed, the staged forward is the layer's forward (kept or recomputed block
    inputs alike), and each group is shown exactly what its Linears read in the real forward."""
    model = tiny_model(arch)
    layer = decoder_layers(model)[0]
    batches = _batches(model)
    expected = run_layer(layer, batches)
    read: dict[str, list[torch.Tensor]] = {}
    for name in ATTENTION_IN + ATTENTION_OUT + MLP_IN + MLP_OUT:
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: read.setdefault(name, []).append(args[0].clone())
        )
    with torch.no_grad():
        for batch in batches:
            layer(batch.hidden, **batch.kwargs)
    shown: dict[str, list[torch.Tensor]] = {}
    order: list[list[str]] = []

    def on_group(names: list[str], inputs: Iterable[torch.Tensor]) -> None:
        order.append(names)
        shown[names[0]] = [x.clone() for x in inputs]

    staged = _copy(batches)
    staged_forward(layer, staged, on_group, store_bytes)
    assert order == [ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT]
    for names in order:
        for got, want in zip(shown[names[0]], read[names[0]][: len(batches)], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for batch, out in zip(staged, expected, strict=True):
        torch.testing.assert_close(batch.hidden, out, rtol=1e-5, atol=1e-6)
    assert stages_match(layer, batches[0])


def test_a_group_reads_what_the_groups_modified_before_it_produce() -> None:
    """The o projection is observed on the attention of the *modified* q/k/v, and the layer's output
    is that of the modified layer: with v zeroed at the first group, o reads zeros."""
    model = tiny_model()
    layer = decoder_layers(model)[0]
    batches = _batches(model, seed=1)
    seen: dict[str, list[torch.Tensor]] = {}

    def on_group(names: list[str], inputs: Iterable[torch.Tensor]) -> None:
        seen[names[0]] = list(inputs)
        if names == ATTENTION_IN:
            with torch.no_grad():
                layer.get_submodule("self_attn.v_proj").weight.zero_()

    staged = _copy(batches)
    staged_forward(layer, staged, on_group)
    assert all(bool((x == 0).all()) for x in seen[ATTENTION_OUT[0]])
    for batch, out in zip(staged, run_layer(layer, batches), strict=True):
        torch.testing.assert_close(batch.hidden, out, rtol=1e-5, atol=1e-6)


class _ParallelBlock(nn.Module):
    """A decoder layer with the Llama module names but attention and MLP side by side (as GPT-J and
    Falcon wire them): the staged forward would compute something else."""

    def __init__(self, llama_layer: nn.Module) -> None:
        super().__init__()
        for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            setattr(self, name, llama_layer.get_submodule(name))

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        return hidden + self.self_attn(normed, **kwargs)[0] + self.mlp(normed)


def test_a_layer_wired_otherwise_is_calibrated_by_the_generic_path() -> None:
    model = tiny_model()
    layers = decoder_layers(model)
    for i in range(len(layers)):
        layers[i] = _ParallelBlock(layers[i])
    batches = _batches(model)
    assert not stages_match(layers[0], batches[0])

    calls: list[str] = []

    def process(_i: int, prefix: str, _layer: nn.Module, replay: Any) -> None:
        calls.append(prefix)
        replay()

    def stage(*_args: Any) -> None:
        raise AssertionError("a parallel block must not be staged")

    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    layerwise(model, ids, process, batch_size=2, stage=stage)
    assert calls == ["model.layers.0", "model.layers.1"]


# Larger than any block a test leaves free in glibc's bins, so the default policy maps it afresh.
SIZE = 192 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    pytest.skip(f"no {field} in /proc/self/status")


def _faults_per_round(rounds: int, size: int = SIZE) -> list[int]:
    """Minor page faults of this thread allocating, touching and freeing ``size`` bytes, per round
    (one torch thread, so every page is touched here; other threads' faults are not counted)."""
    counts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            torch.ones(size // 4)
            counts.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    finally:
        torch.set_num_threads(threads)
    return counts


def test_retained_heap_reuses_freed_activations_instead_of_faulting_them_in_again() -> None:
    if heap._libc() is None:
        pytest.skip("not glibc: the allocator policy is a no-op")
    pages = SIZE // resource.getpagesize()
    heap.trim()
    assert all(count > pages // 2 for count in _faults_per_round(3))  # unmapped on free, faulted in again
    with heap.retained_heap():
        inside = _faults_per_round(4)  # the first round grows the heap
        kept = _status_kib("RssAnon")  # the freed block stays resident, ready for the next batch
    assert sum(count < pages // 8 for count in inside[1:]) >= 2, inside
    assert kept - _status_kib("RssAnon") > SIZE // 2048  # on exit it goes back to the system (KiB)


def test_after_a_layer_loop_freed_blocks_are_reused_as_in_a_fresh_process() -> None:
    """Setting any allocator parameter switches glibc's dynamic mmap threshold off for good; on exit the
    policies settle where it would have settled, so later 16 MiB tensors (evaluation, the next job)
    reuse freed memory instead of faulting every page in again."""
    if heap._libc() is None:
        pytest.skip("not glibc: the allocator policy is a no-op")
    size = 16 << 20
    for policy in (heap.retained_heap, heap.mapped_large_blocks):
        with policy():
            pass
        faults = _faults_per_round(6, size)
        assert sum(count < size // resource.getpagesize() // 8 for count in faults[1:]) >= 4, (policy, faults)


def test_a_replaced_checkpoint_weight_leaves_the_resident_set_and_still_reads_the_same(tmp_path: Path) -> None:
    """set_weight hands the new values a storage of their own; the old tensor's pages in the
    checkpoint's file mapping are released, and reading the old tensor again still gives its values."""
    if heap._libc() is None:
        pytest.skip("not glibc")
    original = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))  # 16 MiB
    save_file({"weight": original}, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", framework="pt") as checkpoint:
        loaded = checkpoint.get_tensor("weight")
    assert not loaded.untyped_storage().resizable()  # the file's pages, not torch's allocator
    linear = nn.Linear(1024, 4096, bias=False)
    linear.weight.data = loaded
    assert torch.equal(loaded, original)  # every page resident now
    before = _status_kib("RssFile")
    set_weight(linear, loaded * 2)
    assert before - _status_kib("RssFile") > 12 * 1024
    assert linear.weight.data_ptr() != loaded.data_ptr()
    assert torch.equal(linear.weight, original * 2)
    assert torch.equal(loaded, original)


def test_every_layer_is_calibrated_with_its_own_mask() -> None:
    """Sliding-window layers receive another attention mask than full-attention ones (and some models
    another RoPE): each layer of the loop gets what the model's own forward gives it."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1, num_hidden_layers=4)
    assert model.config.layer_types == ["full_attention", *["sliding_attention"] * 3]
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states  # [i]: the input of layer i
    outputs: dict[int, torch.Tensor] = {}

    def process(index: int, _prefix: str, _layer: nn.Module, replay: Any) -> None:
        outputs[index] = replay()[0]

    layerwise(model, ids, process, batch_size=4)
    for index in range(3):  # the last output is taken before the final norm, hidden_states[-1] after it
        torch.testing.assert_close(outputs[index], expected[index + 1], rtol=1e-5, atol=1e-5)
