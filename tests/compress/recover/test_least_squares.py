"""Ridge least-squares refit (compress.recover.least_squares) against independent references."""

from __future__ import annotations

import pytest
import torch

from compress.prune.surgery import compensation_bias
from compress.recover.least_squares import PairStats, relative_residual, ridge_refit, select_ridge


def _data(n: int = 400, c: int = 12, out: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) + torch.randn(c, generator=g, dtype=torch.float64)
    w = torch.randn(out, c, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    return x, w, b


def _stats(z: torch.Tensor, y: torch.Tensor, chunks: int = 3) -> PairStats:
    stats = PairStats(z.shape[1], y.shape[1])
    for zc, yc in zip(z.chunk(chunks), y.chunk(chunks), strict=True):
        stats.add_batch(zc, yc)
    return stats


def test_exact_when_removed_channels_are_combinations_of_kept_ones() -> None:
    x, w, b = _data()
    kept = x[:, :8]
    mix = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = torch.cat([kept, kept @ mix + 0.5], dim=1)  # removed channels: affine combinations of the kept ones
    y = x @ w.T + b
    weight, bias = ridge_refit(_stats(kept, y), w[:, :8], alpha=0.0)
    assert torch.allclose(kept @ weight.T + bias, y, atol=1e-9)
    assert relative_residual(_stats(kept, y), weight, bias) < 1e-12
    # bias compensation alone cannot do this
    comp = compensation_bias(w, x.mean(0), torch.arange(12) < 8, b)
    assert not torch.allclose(kept @ w[:, :8].T + comp, y, atol=1e-3)


def test_infinite_ridge_is_flap_bias_compensation() -> None:
    x, w, b = _data()
    keep = torch.tensor([True, False] * 6)
    y = x @ w.T + b
    stats = _stats(x[:, keep], y)
    weight, bias = ridge_refit(stats, w[:, keep], alpha=float("inf"))
    reference = compensation_bias(w, x.mean(0), keep, b)
    assert torch.equal(weight, w[:, keep])
    assert torch.allclose(bias, reference, atol=1e-12)
    # and the finite ridge converges to it
    weight_big, bias_big = ridge_refit(stats, w[:, keep], alpha=1e8)
    assert torch.allclose(weight_big, w[:, keep], atol=1e-6) and torch.allclose(bias_big, reference, atol=1e-5)


def test_ridge_matches_an_explicit_augmented_least_squares() -> None:
    x, w, b = _data(seed=2)
    keep = torch.arange(12) % 3 != 0
    y = x @ w.T + b + 0.1 * torch.randn(400, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = x[:, keep]
    alpha = 0.3
    weight, bias = ridge_refit(_stats(z, y), w[:, keep], alpha)
    # reference: minimise ‖[Z_c; √λ I] Wᵀ − [Y_c; √λ W_Kᵀ]‖² with lstsq, λ relative to the centred Gram diagonal
    zc, yc = z - z.mean(0), y - y.mean(0)
    lam = alpha * float((zc * zc).sum(0).mean())
    a = torch.cat([zc, lam**0.5 * torch.eye(z.shape[1], dtype=torch.float64)])
    rhs = torch.cat([yc, lam**0.5 * w[:, keep].T])
    ref_w = torch.linalg.lstsq(a, rhs).solution.T
    assert torch.allclose(weight, ref_w, atol=1e-9)
    assert torch.allclose(bias, y.mean(0) - ref_w @ z.mean(0), atol=1e-9)
    direct = float(((z @ weight.T + bias - y) ** 2).sum() / (yc**2).sum())
    assert relative_residual(_stats(z, y), weight, bias) == pytest.approx(direct, rel=1e-8)


def test_errors() -> None:
    stats = PairStats(3, 2)
    with pytest.raises(ValueError, match="no calibration tokens"):
        ridge_refit(stats, torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="tokens"):
        stats.add_batch(torch.zeros(4, 3), torch.zeros(5, 2))
    stats.add_batch(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="alpha"):
        ridge_refit(stats, torch.zeros(2, 3), -1.0)


def test_select_ridge_picks_the_best_held_out_alpha() -> None:
    x, w, b = _data(n=60, c=40, seed=5)  # few tokens per channel: the unregularised fit overfits the noise
    keep = torch.arange(40) < 30
    noise = torch.randn(60, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = x @ w.T + b + 2.0 * noise
    fit, held = _stats(x[:40, keep], y[:40], 2), _stats(x[40:, keep], y[40:], 2)
    alphas = [0.0, 0.01, 1.0, 100.0]
    alpha, score = select_ridge(fit, held, w[:, keep], alphas)
    scores = {a: relative_residual(held, *ridge_refit(fit, w[:, keep], a)) for a in alphas}
    assert score == min(scores.values()) and scores[alpha] == score
    assert alpha > 0.0  # the plain fit is not the held-out best here
    merged = fit.merged(held)
    direct = _stats(x[:, keep], y, 4)
    assert merged.count == 60 and torch.allclose(merged.zz, direct.zz) and merged.sum_yy == pytest.approx(direct.sum_yy)
