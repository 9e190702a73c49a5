"""Closed-form refit of a pruned consumer linear (o_proj / down_proj): ridge least squares in float64.

Notation (one consumer, N calibration tokens): the dense sub-block's output is ``y_t = W x_t + b`` ([out]) with
``x_t`` ([C]) the dense consumer input on the *dense* stream; the pruned sub-block sees ``z_t`` ([K], the kept
channels of its consumer input on the *compressed* stream). The refit solves

    min_{W', b'}  Σ_t ‖W' z_t + b' − y_t‖²  +  λ ‖W' − W_K‖²_F,        λ = α · mean_j (Z_c Z_cᵀ)_jj

with ``W_K = W[:, kept]`` the kept columns and ``Z_c`` the centred inputs. The bias is free (not regularised), so
the means are handled through it:

    W'ᵀ = (Z_c Z_cᵀ + λ I)⁻¹ (Z_c Y_cᵀ + λ W_Kᵀ),        b' = ȳ − W' z̄.

Limits: α → ∞ gives W' = W_K and b' = ȳ − W_K z̄; on the dense stream (z = x[kept]) that is
b + W[:, P] x̄[P], FLAP's bias compensation (eq. 9) exactly. α → 0 is the unregularised least-squares fit, which
reproduces y exactly when the removed channels are (affine) linear combinations of the kept ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PairStats:
    """Streaming sufficient statistics (float64) of aligned input/target pairs (z_t [K], y_t [out]).

    After N tokens: Σz [K], Σy [out], Σ z zᵀ [K, K], Σ z yᵀ [K, out], Σ‖y‖² (scalar).
    """

    inputs: int
    outputs: int
    count: int = 0
    sum_yy: float = 0.0
    sum_z: Tensor = field(init=False)
    sum_y: Tensor = field(init=False)
    zz: Tensor = field(init=False)
    zy: Tensor = field(init=False)

    def __post_init__(self) -> None:
        f64 = torch.float64
        self.sum_z = torch.zeros(self.inputs, dtype=f64)
        self.sum_y = torch.zeros(self.outputs, dtype=f64)
        self.zz = torch.zeros(self.inputs, self.inputs, dtype=f64)
        self.zy = torch.zeros(self.inputs, self.outputs, dtype=f64)

    def add_batch(self, z: Tensor, y: Tensor) -> None:
        """z: [..., K] inputs, y: [..., out] targets of the same tokens."""
        z64 = z.detach().reshape(-1, self.inputs).to(torch.float64).cpu()
        y64 = y.detach().reshape(-1, self.outputs).to(torch.float64).cpu()
        if z64.shape[0] != y64.shape[0]:
            raise ValueError(f"{z64.shape[0]} input tokens but {y64.shape[0]} target tokens")
        self.count += z64.shape[0]
        self.sum_z += z64.sum(0)
        self.sum_y += y64.sum(0)
        self.zz += z64.T @ z64
        self.zy += z64.T @ y64
        self.sum_yy += float((y64 * y64).sum())

    def merged(self, other: PairStats) -> PairStats:
        """Statistics of both token sets together."""
        out = PairStats(self.inputs, self.outputs)
        out.count, out.sum_yy = self.count + other.count, self.sum_yy + other.sum_yy
        out.sum_z, out.sum_y = self.sum_z + other.sum_z, self.sum_y + other.sum_y
        out.zz, out.zy = self.zz + other.zz, self.zy + other.zy
        return out

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(z̄ [K], ȳ [out], Z_c Z_cᵀ [K, K], Z_c Y_cᵀ [K, out])."""
        n = max(self.count, 1)
        z_mean, y_mean = self.sum_z / n, self.sum_y / n
        gram = self.zz - n * torch.outer(z_mean, z_mean)
        cross = self.zy - n * torch.outer(z_mean, y_mean)
        return z_mean, y_mean, gram, cross


def ridge_refit(stats: PairStats, prior: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Ridge least-squares refit of a consumer towards its kept weights (module docstring).

    Args:
        stats: sufficient statistics of (z = kept consumer inputs on the compressed stream, y = dense outputs).
        prior: [out, K] the kept columns W_K of the dense consumer (the ridge centre).
        alpha: λ relative to the mean diagonal of the centred Gram matrix Z_c Z_cᵀ (0 = plain least squares,
            solved with a pseudo-inverse when the Gram matrix is singular; ``inf`` = bias compensation).
    Returns:
        (weight [out, K], bias [out]), float64.
    """
    if stats.count == 0:
        raise ValueError("no calibration tokens were accumulated")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    z_mean, y_mean, gram, cross = stats.centred()
    w_prior = prior.detach().to(torch.float64).cpu()
    if alpha == float("inf"):
        weight = w_prior
    else:
        lam = alpha * float(gram.diagonal().mean().clamp_min(0.0))
        rhs = cross + lam * w_prior.T
        system = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
        if lam > 0:
            weight = torch.linalg.solve(system, rhs).T
        else:
            weight = (torch.linalg.pinv(system, hermitian=True) @ rhs).T
    bias = y_mean - weight @ z_mean
    return weight, bias


def relative_residual(stats: PairStats, weight: Tensor, bias: Tensor) -> float:
    """Σ_t ‖W z_t + b − y_t‖² / Σ_t ‖y_t − ȳ‖² from the statistics alone (0 = exact; 1 = as good as the mean).

    weight: [out, K], bias: [out] (float64).
    """
    z_mean, y_mean, gram, cross = stats.centred()
    w = weight.to(torch.float64)
    offset = w @ z_mean + bias.to(torch.float64) - y_mean  # error of the means
    total = stats.sum_yy - stats.count * float(y_mean @ y_mean)
    residual = float(torch.sum((w @ gram) * w)) - 2 * float(torch.sum(w.T * cross)) + total
    residual += stats.count * float(offset @ offset)
    return max(0.0, residual) / total if total > 0 else 0.0


def select_ridge(fit: PairStats, holdout: PairStats, prior: Tensor, alphas: list[float]) -> tuple[float, float]:
    """The α of ``alphas`` whose refit on ``fit`` has the lowest relative residual on ``holdout`` (held-out
    calibration tokens, never evaluation data); ties go to the larger α (closer to bias compensation).

    Returns (α, its held-out relative residual).
    """
    best: tuple[float, float] | None = None
    for alpha in sorted(alphas, reverse=True):
        weight, bias = ridge_refit(fit, prior, alpha)
        score = relative_residual(holdout, weight, bias)
        if best is None or score < best[1]:
            best = (alpha, score)
    assert best is not None, "alphas is empty"
    return best


# ridge grid chosen from on held-out calibration tokens when none is given; 1e4 is bias compensation in effect
RIDGE_GRID = [0.01, 0.1, 1.0, 10.0, 100.0, 1e4]


def reduced_rank(stats: PairStats, weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` restriction of a least-squares map (reduced-rank regression, Izenman 1975).

    With Ŷ_c = W Z_c the fitted centred outputs, project W onto the top-r eigenvectors V_r [out, r] of
    Ŷ_c Ŷ_cᵀ = W (Z_c Z_cᵀ) Wᵀ:  W_r = V_r V_rᵀ W, which for the unregularised fit minimises Σ_t ‖W_r z_t − y_t‖²
    over all maps of rank ≤ r. Returns (up = V_r [out, r], down = V_rᵀ W [r, K], bias [out] = ȳ − W_r z̄), float64.
    """
    z_mean, y_mean, gram, _ = stats.centred()
    w = weight.to(torch.float64)
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"rank must be in 1..{min(w.shape)}, got {rank}")
    _, vectors = torch.linalg.eigh(w @ gram @ w.T)  # ascending eigenvalues
    up = vectors[:, -rank:].flip(-1)
    down = up.T @ w
    return up, down, y_mean - up @ (down @ z_mean)
