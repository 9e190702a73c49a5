"""AWQ-style activation-aware scaling and clipping (pure math; folding into the model is in ``compress``).

AWQ (Lin et al., MLSys 2024, arXiv 2306.00978). For linears W_i [out_i, in] that read the same input X [n, in],
scale input channel j by s_j (folded into whatever produces X, so the float function is unchanged) and search

    s = s_X^α / sqrt(max(s_X^α) · min(s_X^α)),  s_X = mean_t |x_tj|,  α ∈ {0, 1/N, …, (N−1)/N}
    α* = argmin_α Σ_i ‖Q(W_i · diag(s)) · diag(s)⁻¹ Xᵀ − W_i Xᵀ‖²                                  (AWQ eq. 4-5)

(α = 0 is s = 1, plain quantization, so the search never makes the sampled error worse). Clip search (AWQ's
``auto_clip``): per output row and group, the clipping threshold r·max|w| with r ∈ {1, 1 − 1/N, …} minimising
the group's output error ‖(w_g − Q(clip(w_g))) · x_gᵀ‖² over the sampled tokens.
Q is any fake quantizer (here: the per-group datatype choice of :mod:`quant.select`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from quant.errors import InputError

FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # W [out, in] → Ŵ [out, in]


def _check_inputs(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
    if x.dim() != 2 or x.shape[0] == 0 or any(w.dim() != 2 or w.shape[1] != x.shape[1] for w in weights):
        raise InputError(
            f"x: expected [n > 0, in] matching every weight's in, got {tuple(x.shape)} and "
            f"{[tuple(w.shape) for w in weights]}"
        )


@torch.no_grad()
def search_scales(
    x: torch.Tensor, weights: Sequence[torch.Tensor], quantizers: Sequence[FakeQuant], n_grid: int = 20
) -> tuple[torch.Tensor, float]:
    """AWQ scale search. x: [n, in] sampled inputs; weights: W_i [out_i, in]; quantizers: one Q per W_i.

    Returns (s float32 [in], α*). Ties keep the smaller α (α = 0 first)."""
    _check_inputs(x, weights)
    if n_grid < 1 or len(quantizers) != len(weights):
        raise InputError(f"n_grid: expected ≥ 1 and one quantizer per weight, got {n_grid}, {len(quantizers)}")
    x = x.float()
    x_mean = x.abs().mean(0)
    reference = [x @ w.float().T for w in weights]
    best: tuple[float, torch.Tensor, float] | None = None
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, q, y in zip(weights, quantizers, reference, strict=True):
            w_hat = q(w.float() * s) / s
            err += float((x @ w_hat.T - y).square().sum())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


@torch.no_grad()
def search_clip(
    W: torch.Tensor, x: torch.Tensor, quantize: FakeQuant, group_size: int, n_grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """AWQ clip search. W: [out, in]; x: [n, in]; returns the clipping threshold float32 [out, n_groups]
    (max|w| of the group times the best ratio r ∈ {1, 1 − 1/N, …, > 1 − max_shrink})."""
    _check_inputs(x, [W])
    if group_size < 1 or n_grid < 1 or not 0 <= max_shrink < 1:
        raise InputError(f"group_size/n_grid/max_shrink: got {group_size}, {n_grid}, {max_shrink}")
    out, n_in = W.shape
    n_groups = -(-n_in // group_size)
    pad = n_groups * group_size - n_in
    W = W.float()
    wg = torch.nn.functional.pad(W, (0, pad)).view(out, n_groups, group_size)
    xg = torch.nn.functional.pad(x.float(), (0, pad)).view(-1, n_groups, group_size)
    reference = torch.einsum("tgk,ogk->tog", xg, wg)
    org_max = wg.abs().amax(-1)  # [out, g]
    best_err = torch.full((out, n_groups), float("inf"))
    best_max = org_max.clone()
    for k in range(int(max_shrink * n_grid)):
        limit = org_max * (1 - k / n_grid)
        clipped = torch.maximum(torch.minimum(wg, limit.unsqueeze(-1)), -limit.unsqueeze(-1))
        q = quantize(clipped.view(out, -1)[:, :n_in])
        qg = torch.nn.functional.pad(q.float(), (0, pad)).view(out, n_groups, group_size)
        err = (torch.einsum("tgk,ogk->tog", xg, qg) - reference).square().mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, limit, best_max)
    return best_max


def apply_clip(W: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [out, in] clamped to ±max_val [out, n_groups] group-wise (same dtype as W)."""
    limit = max_val.repeat_interleave(group_size, dim=1)[:, : W.shape[1]].to(W.dtype)
    return torch.maximum(torch.minimum(W, limit), -limit)
