"""Input statistics of a decoder layer's Linear modules, gathered in one pass over the calibration data.

GPTQ and SparseGPT need the Hessian proxy ``H = 2/n · Xᵀ X`` of every Linear's input ``X``; Wanda
needs the per-channel input norms ``‖X_j‖₂``, i.e. ``sqrt(n/2 · diag H)``. Linears that read the same
tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one accumulator, so the
rank-k update is computed once per shared input rather than once per module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.compression.base import EngineError
from workers.compression.layerwise import StopLayer


@dataclass
class InputStats:
    """Running ``Xᵀ X`` (float32) and token count for one distinct input tensor.

    With ``diag_only`` only the diagonal ``Σ x_j²`` is kept (``xtx`` is 1-D): all Wanda and channel
    importance need, at ``T·d`` instead of ``2·T·d²`` FLOPs.
    """

    xtx: torch.Tensor
    tokens: int = 0
    modules: list[str] = field(default_factory=list)
    diag_only: bool = False
    output_energy: dict[str, float] = field(default_factory=dict)
    """``Σ ‖x Wᵀ‖²`` over the calibration tokens of each reading module whose forward ran while
    observed (``collect_input_stats(output_energy=True)``; bias left out): what ``tr(W XᵀX Wᵀ)``
    would compute with a matmul of ``out · in²``, read off outputs the observation made anyway."""

    @classmethod
    def empty(cls, width: int, device: torch.device, modules: list[str], diag_only: bool = False) -> InputStats:
        """Zero statistics for an input of ``width`` channels read by ``modules``."""
        shape = (width,) if diag_only else (width, width)
        xtx = torch.zeros(shape, dtype=torch.float32, device=device)
        return cls(xtx=xtx, modules=list(modules), diag_only=diag_only)

    @classmethod
    def of(cls, inputs: Iterable[torch.Tensor], modules: list[str], diag_only: bool = False) -> InputStats | None:
        """Statistics of every batch in ``inputs`` (``[..., width]``), finished; ``None`` if there was none."""
        stats: InputStats | None = None
        for x in inputs:
            stats = stats or cls.empty(x.shape[-1], x.device, modules, diag_only)
            stats.add(x)
        if stats is not None:
            stats.finish()
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.diag_only:
            self.xtx.add_(x.square().sum(0))
        else:
            _accumulate_upper(self.xtx, x)
        self.tokens += x.shape[0]

    def finish(self) -> None:
        """Mirror the accumulated upper blocks into the lower ones (once, after the last batch)."""
        if not self.diag_only:
            for a0, a1 in itertools.pairwise(_block_edges(self.xtx.shape[0])):
                self.xtx[a1:, a0:a1] = self.xtx[a0:a1, a1:].T

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n · Xᵀ X`` (the GPTQ/SparseGPT convention)."""
        if self.diag_only:
            raise ValueError("statistics were collected with diag_only=True; the full Hessian is not available")
        return self.xtx * (2.0 / max(self.tokens, 1))

    def output_scale(self, name: str) -> float | None:
        """``tr(W H Wᵀ)`` of module ``name`` against :attr:`hessian`, when its output energy was recorded."""
        energy = self.output_energy.get(name)
        return None if energy is None else energy * 2.0 / max(self.tokens, 1)

    @property
    def channel_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` for every input channel j (Wanda's activation term)."""
        diagonal = self.xtx if self.diag_only else torch.diagonal(self.xtx)
        return torch.sqrt(torch.clamp(diagonal, min=0.0))


def block_count(d: int) -> int:
    """Row panels :func:`_accumulate_upper` splits a width-``d`` ``XᵀX`` into (fewer for small ``d``,
    where narrow products run slowly)."""
    return 8 if d >= 1024 else (4 if d >= 512 else (2 if d >= 128 else 1))


def _block_edges(d: int) -> list[int]:
    count = block_count(d)
    return [d * i // count for i in range(count + 1)]


def _accumulate_upper(xtx: torch.Tensor, x: torch.Tensor) -> None:
    """``xtx += xᵀx`` on and above the diagonal blocks only (a symmetric rank-k update: BLAS has
    ``syrk``, torch does not): one product per row panel, from its diagonal block to the right edge.
    With 4 panels that is 10 of 16 block products, with 8 panels 36 of 64; :meth:`InputStats.finish`
    mirrors the result."""
    edges = _block_edges(x.shape[1])
    for a0, a1 in itertools.pairwise(edges):
        # addmm_ on transposed views: no temporary for the product.
        xtx[a0:a1, a0:].addmm_(x[:, a0:a1].T, x[:, a0:])


def collect_input_stats(
    layer: nn.Module,
    replay: Callable[[], Any],
    select: Callable[[str, nn.Linear], bool] = lambda _n, _m: True,
    diag_only: bool = False,
    stop_early: bool = True,
    output_energy: bool = False,
) -> dict[str, InputStats]:
    """Run ``replay()`` once with hooks and return ``{linear name: stats}`` for the selected Linears.

    Names sharing an input map to the same :class:`InputStats` object (see ``stats.modules``).
    ``diag_only`` keeps per-channel sums of squares instead of the full ``Xᵀ X``. With
    ``stop_early`` each call of the layer ends (:class:`StopLayer`) as soon as every selected Linear
    has seen its input: the rest of the layer (e.g. the down projection's matmul when it is the
    last one, the whole MLP when only ``o_proj`` is selected) is never computed. Pass ``False``
    when other hooks must see the whole forward. ``output_energy`` also records every selected
    Linear's :attr:`InputStats.output_energy` (those the early stop skips have none).
    """
    by_name: dict[str, InputStats] = {}
    selected = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and select(n, m)}
    # Within one call of the layer, inputs are identified by storage pointer. The map holds a
    # reference to each tensor so its address cannot be reused by a later activation during the
    # call, and is cleared at every layer call.
    current: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, InputStats]] = {}
    seen: set[str] = set()

    def reset(_m: nn.Module, _args: Any) -> None:
        current.clear()
        seen.clear()

    def make_hook(name: str, in_features: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            hit = current.get(key)
            if hit is not None:
                shared = hit[1]
                if name not in by_name:
                    by_name[name] = shared
                    shared.modules.append(name)
            else:
                stats = by_name.get(name)
                if stats is None:
                    stats = InputStats.empty(in_features, x.device, [name], diag_only)
                    by_name[name] = stats
                stats.add(x)
                current[key] = (x, stats)
            seen.add(name)
            if stop_early and seen == selected:
                raise StopLayer

        return hook

    def record_energy(name: str) -> Callable[..., None]:
        def hook(module: nn.Linear, _args: Any, out: torch.Tensor) -> None:
            y = out.detach()
            if module.bias is not None:
                y = y - module.bias
            energies = by_name[name].output_energy
            energies[name] = energies.get(name, 0.0) + float(torch.linalg.vector_norm(y, dtype=torch.float32)) ** 2

        return hook

    handles = [layer.register_forward_pre_hook(reset)]
    for name, module in layer.named_modules():
        if name in selected:
            handles.append(module.register_forward_pre_hook(make_hook(name, module.in_features)))
            if output_energy:
                handles.append(module.register_forward_hook(record_energy(name)))
    try:
        with torch.no_grad():
            replay()
    finally:
        for handle in handles:
            handle.remove()
    for stats in {id(s): s for s in by_name.values()}.values():
        stats.finish()
    return by_name


def inverse_cholesky(h: torch.Tensor, dampening_frac: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the damped ``H⁻¹`` (``H⁻¹ = UᵀU``: what GPTQ's and SparseGPT's
    column updates read); retries with ten times the dampening while ``H`` is numerically singular.

    One factorisation (:func:`_cholesky_lower`) and one triangular inverse (:func:`_invert_upper`): with
    ``J`` the reversal permutation and
    ``JHJ = MMᵀ``, ``R = JMJ`` is upper triangular with ``H = RRᵀ``, so ``H⁻¹ = R⁻ᵀR⁻¹`` and
    ``U = R⁻¹``; a third of the work of inverting ``H`` and factorising the inverse.
    ``h`` is the caller's scratch copy and is damped in place.
    """
    n = h.shape[0]
    diag = torch.arange(n, device=h.device)
    damp = dampening_frac * torch.mean(torch.diag(h))
    added = torch.zeros((), device=h.device)
    for _ in range(5):
        h[diag, diag] += damp - added
        added = damp
        lower = h.flip(0, 1)
        if _cholesky_lower(lower):
            upper = lower.flip(0, 1)
            del lower
            inverse = torch.empty_like(upper)
            _invert_upper(upper, inverse)
            return inverse
        # Too few tokens for the width: dampen harder, as llm-compressor's users do by hand.
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=h.device)
    raise EngineError(f"{name}: Hessian is not positive definite even with strong dampening; add calibration data")


def _cholesky_lower(a: torch.Tensor, leaf: int = 192) -> bool:
    """Factorise the symmetric ``a`` in place into its lower Cholesky factor (``a = LLᵀ``; the part
    above the diagonal is zeroed), by halves: ``L₁₁ = chol(A₁₁)``, ``L₂₁ = A₂₁L₁₁⁻ᵀ``,
    ``L₂₂ = chol(A₂₂ - L₂₁L₂₁ᵀ)``. False when ``a`` is not numerically positive definite.

    LAPACK's ``potrf`` runs at a fraction of the matmul rate on a few cores (56 against 325 GFLOP/s at
    n = 1536 on 2 Xeon cores); by halves, most of the work is one triangular solve and one product:
    12 against 20 ms there, agreeing to float rounding.
    """
    n = a.shape[0]
    if n <= leaf:
        lower, info = torch.linalg.cholesky_ex(a)
        a.copy_(lower)
        return int(info) == 0
    m = n // 2
    if not _cholesky_lower(a[:m, :m], leaf):
        return False
    # L₂₁ᵀ = L₁₁⁻¹ A₁₂, written over A₁₂; then A₂₂ -= L₂₁ L₂₁ᵀ.
    a[:m, m:] = torch.linalg.solve_triangular(a[:m, :m], a[:m, m:], upper=False)
    a[m:, m:].addmm_(a[:m, m:].T, a[:m, m:], alpha=-1)
    if not _cholesky_lower(a[m:, m:], leaf):
        return False
    a[m:, :m] = a[:m, m:].T
    a[:m, m:].zero_()
    return True


def _invert_upper(upper: torch.Tensor, out: torch.Tensor, leaf: int = 128) -> None:
    """``out = upper⁻¹`` for an upper-triangular matrix, by halves:
    ``[[A, B], [0, C]]⁻¹ = [[A⁻¹, -A⁻¹ B C⁻¹], [0, C⁻¹]]``.

    LAPACK's triangular inverse (``trtri``) is not in torch, and ``solve_triangular`` against the
    identity does ``n³`` FLOPs in a triangular solve; the halves do ``2n³/3`` in matrix products
    (``n³/2`` at the top level, a quarter of that per level below): twice as fast at n = 1536 (19
    against 37 ms on 2 cores), agreeing to float rounding.
    """
    n = upper.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=upper.dtype, device=upper.device)
        torch.linalg.solve_triangular(upper, eye, upper=True, out=out)
        return
    m = n // 2
    _invert_upper(upper[:m, :m], out[:m, :m], leaf)
    _invert_upper(upper[m:, m:], out[m:, m:], leaf)
    torch.mm(torch.mm(out[:m, :m], upper[:m, m:]), out[m:, m:], out=out[:m, m:])
    out[:m, m:].neg_()
    out[m:, :m].zero_()
