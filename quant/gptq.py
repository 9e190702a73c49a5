"""GPTQ with a per-group datatype choice (pure math: tensors in, :class:`QuantizedWeight` out).

GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323) quantizes the columns of W [out, in] one at a time and spreads
each column's error over the columns not yet quantized, minimising ‖(W − Ŵ) X‖² with H = 2XXᵀ/N:

    U = chol(H⁻¹)ᵀ (upper),   for column p:  q_p = Q(w_p),   e = (w_p − q_p) / U_pp,   W_{:, p:} −= e · U_{p, p:}

(eq. 3-5 of the paper, in the "lazy batch" form with blocks of B columns and the Cholesky form of H⁻¹).
Dampening: H += λ·mean(diag H)·I (``damp`` = λ). Dead inputs (H_jj = 0) get H_jj = 1 and w_j = 0.

Per-group datatypes: when the loop first reaches a column of group g, the group's datatype, scale (and zero
point) are chosen by :func:`quant.select.choose_group_datatypes` on the *current*, error-updated weights of all
columns of that group, weighting each column's squared error by 1/U_jj² (its GPTQ loss weight); then each of
its columns is rounded with those fixed parameters when the loop reaches it. With ``act_order`` the columns are
visited in order of decreasing H_jj but groups stay the static runs of G consecutive input channels (the packed
format and the kernels are unchanged); a group's parameters are chosen when its first column is visited (none of
its columns is quantized yet at that point).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quant.datatypes import DatatypeSet, get_datatype_set
from quant.errors import InputError
from quant.pack import QuantizedWeight
from quant.select import _check_weight, _resolve_group_size, choose_group_datatypes


def _midpoints(dtset: DatatypeSet) -> torch.Tensor:
    """float32 [n_types, 2**bits − 1]: the rounding thresholds of each member's distinct levels (+inf pads)."""
    mids = torch.full((len(dtset.members), 2**dtset.bits - 1), float("inf"))
    for t, member in enumerate(dtset.members):
        levels = member.distinct_values
        for k, (lo, hi) in enumerate(zip(levels[:-1], levels[1:], strict=True)):
            mids[t, k] = (lo + hi) / 2
    return mids


def quantize_column(
    w: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    mids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round one column with fixed group parameters, exactly as :mod:`quant.select` rounds.

    w: [out]; type_ids uint8, scales fp16, zeros fp16 | None: [out]. Symmetric: code = nearest level of w/s (ties
    toward zero); asymmetric: code = clamp(round(w/s) + z, 0, 2^b − 1). Returns (codes uint8 [out], ŵ float32
    [out] = (tables[t, code] − z)·s, the reference dequantization).
    """
    s = scales.float()
    x = w.float() / s
    if zeros is not None:
        z = zeros.float()
        qmax = float(tables.shape[1] - 1)
        q = torch.clamp(torch.sign(x) * torch.ceil(x.abs() - 0.5), -z, qmax - z)
        codes = (q + z).to(torch.uint8)
    else:
        m = mids[type_ids.long()]  # [out, K − 1]
        xe = x.unsqueeze(-1)
        codes = ((xe > m) | ((xe == m) & (m < 0))).sum(-1).to(torch.uint8)
    values = tables[type_ids.long(), codes.long()]
    return codes, (values - (zeros.float() if zeros is not None else 0.0)) * s


class _GroupRounder:
    """:func:`quantize_column` with one group's parameters gathered once (the GPTQ loop calls it per column).

    Same arithmetic: x = w/s in float32; symmetric codes count the thresholds below x, where "x ≥ m" for a
    negative midpoint m is "x > m⁻" with m⁻ the next float32 below m; ŵ = (table[t, code] − z)·s."""

    def __init__(self, type_ids: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 tables: torch.Tensor, mids: torch.Tensor) -> None:  # fmt: skip
        self.s = scales.float()
        self.z = None if zeros is None else zeros.float()
        self.rows = tables[type_ids.long()]  # [out, K]
        m = mids[type_ids.long()]  # [out, K − 1]
        self.m = torch.where(m < 0, torch.nextafter(m, torch.tensor(-float("inf"))), m)
        self.qmax = float(tables.shape[1] - 1)

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = w.float() / self.s
        if self.z is not None:
            q = torch.clamp(torch.sign(x) * torch.ceil(x.abs() - 0.5), -self.z, self.qmax - self.z)
            codes = (q + self.z).to(torch.uint8)
            return codes, (self.rows.gather(1, codes.long().unsqueeze(1)).squeeze(1) - self.z) * self.s
        codes = (x.unsqueeze(-1) > self.m).sum(-1).to(torch.uint8)
        return codes, self.rows.gather(1, codes.long().unsqueeze(1)).squeeze(1) * self.s


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ (float64)."""
    H = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise InputError(f"H: not positive definite after dampening {damp} (raise quantize.damp)")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _check_hessian(H: torch.Tensor, in_features: int) -> None:
    if H.shape != (in_features, in_features) or not bool(torch.isfinite(H).all()):
        raise InputError(f"H: expected a finite [{in_features}, {in_features}] matrix, got {tuple(H.shape)}")


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    dtset: DatatypeSet | str,
    group_size: int | None = 128,
    shrink_factors: Sequence[float] = (1.0,),
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_ceiling: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize W [out, in] with Hessian H [in, in] (= 2XXᵀ/N), choosing each group's datatype on the fly.

    scale_ceiling: float32 [out, n_groups], the 8-bit scale grid (see :mod:`quant.storage`), or None.
    Returns the same structure as :func:`quant.select.choose_group_datatypes` (codes in the original order).
    """
    dtset = get_datatype_set(dtset) if isinstance(dtset, str) else dtset
    _check_weight(W)
    out_features, n = W.shape
    _check_hessian(H, n)
    if dtset.asymmetric and len(dtset.members) > 1:
        raise InputError(f"dtset: GPTQ supports asymmetric members only in single-type sets, got {dtset.name}")
    if not 0 <= damp or block_size < 1:
        raise InputError(f"damp/block_size: expected damp ≥ 0 and block_size ≥ 1, got {damp}, {block_size}")
    G = _resolve_group_size(group_size, n, dtset)
    n_groups = -(-n // G)
    device = W.device
    W = W.detach().double().cpu().clone()
    H = H.detach().double().cpu().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_hessian_factor(H, damp)
    loss_weight = 1.0 / torch.diagonal(U).square()  # per permuted position

    tables = dtset.tables()
    mids = _midpoints(dtset)
    codes = torch.zeros(out_features, n, dtype=torch.uint8)
    type_ids = torch.zeros(out_features, n_groups, dtype=torch.uint8)
    scales = torch.zeros(out_features, n_groups, dtype=torch.float16)
    zeros = torch.zeros(out_features, n_groups, dtype=torch.float16) if dtset.asymmetric else None
    chosen: list[_GroupRounder | None] = [None] * n_groups
    order, diag = perm.tolist(), torch.diagonal(U).tolist()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        block_codes = torch.zeros(out_features, i2 - i1, dtype=torch.uint8)
        for i in range(i2 - i1):
            p = i1 + i
            g = order[p] // G
            rounder = chosen[g]
            if rounder is None:
                pos = inv[g * G : min((g + 1) * G, n)]
                current = W[:, pos] - Err1[:, :i] @ U[i1:p][:, pos]  # the group's error-updated weights
                c = loss_weight[pos]
                ceiling = None if scale_ceiling is None else scale_ceiling[:, g : g + 1].cpu()
                qw = choose_group_datatypes(current, dtset, G, shrink_factors, (c / c.max()).float(), ceiling)
                type_ids[:, g], scales[:, g] = qw.type_ids[:, 0], qw.scales[:, 0]
                if zeros is not None and qw.zeros is not None:
                    zeros[:, g] = qw.zeros[:, 0]
                z = None if zeros is None else zeros[:, g]
                rounder = chosen[g] = _GroupRounder(type_ids[:, g], scales[:, g], z, tables, mids)
            w = W1[:, i]
            col_codes, q = rounder(w)
            block_codes[:, i] = col_codes
            err = (w - q.double()) / diag[p]
            W1[:, i + 1 :] -= err.unsqueeze(1) * U[p, p + 1 : i2].unsqueeze(0)  # column i is not read again
            Err1[:, i] = err
        codes[:, perm[i1:i2]] = block_codes
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return QuantizedWeight(
        codes=codes.to(device),
        type_ids=type_ids.to(device),
        scales=scales.to(device),
        zeros=None if zeros is None else zeros.to(device),
        tables=tables.to(device),
        bits=dtset.bits,
        group_size=G,
        in_features=n,
    )
