"""Per-group datatype selection (BitMoD "fine-grained data type adaptation"), fully vectorised.

For a weight matrix W [out, in] cut into groups of G consecutive input weights of one row, and for every
candidate type t of the set (and shrink factor α):

    symmetric:   s_t = α · max_j |w_j| / max|grid_t|,   ŵ_j = s_t · nearest_t(w_j / s_t)
    asymmetric:  s = α · (max(w⁺) − min(w⁻)) / (2^b − 1),   z = clamp(round(−α·min(w⁻) / s), 0, 2^b − 1),
                 ŵ_j = s · (clamp(round(w_j / s), −z, 2^b − 1 − z))        (w⁺ = max(w, 0), w⁻ = min(w, 0))
    error:       E_t = Σ_j c_j (w_j − ŵ_j)²,   c_j = E[x_j²] (the "E[x²]-weighted" choice), 1/[H⁻¹]_jj (GPTQ) or 1

and each group keeps argmin_t E_t (ties → the lower type id, then the first shrink factor). Rounding is to the
nearest grid value with ties → smaller magnitude. The scale is rounded to fp16 *before* quantising, so the
choice is judged on exactly what is stored and what :func:`cuda_ext.reference.dequantize` rebuilds; with 8-bit
(double-quantized) scales the scale is snapped onto the layer's scale grid (:mod:`quant.storage`) instead.
Asymmetric ranges include 0 (the GPTQ convention), so zero is exact and constant groups stay representable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from quant.datatypes import Datatype, DatatypeSet, get_datatype_set
from quant.errors import InputError
from quant.pack import QuantizedWeight
from quant.storage import snap_scales

FP16_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal): a group of zeros gets this scale
FP16_MAX_SCALE = 65504.0
PAPER_METADATA_BITS = 8  # BitMoD counts 8 bits of metadata per group (4.0625 / 3.0625 bits at G = 128)

# One candidate: codes uint8 [out, g, G], scales fp16 [out, g], zeros fp16 [out, g] | None, ŵ fp32 [out, g, G]
Candidate = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


def _resolve_set(dtset: DatatypeSet | str) -> DatatypeSet:
    return get_datatype_set(dtset) if isinstance(dtset, str) else dtset


def _check_weight(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point() or 0 in W.shape:
        got = f"{W.dtype} {tuple(W.shape)}" if isinstance(W, torch.Tensor) else type(W).__name__
        raise InputError(f"W: expected a non-empty floating-point [out, in] tensor, got {got}")
    if not bool(torch.isfinite(W).all()):
        raise InputError("W: expected finite values, got NaN or inf")


def _resolve_group_size(group_size: int | None, in_features: int, dtset: DatatypeSet) -> int:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise InputError(f"group_size: expected a positive int or None, got {group_size!r}")
    if group_size is not None and group_size < 1:
        raise InputError(f"group_size: expected a positive int or None, got {group_size}")
    if dtset.group_size is not None and group_size != dtset.group_size:
        raise InputError(
            f"group_size: datatype set {dtset.name!r} requires {dtset.group_size}, got {group_size}"
        )
    return in_features if group_size is None else group_size


def _check_shrink(shrink_factors: Sequence[float]) -> None:
    if len(shrink_factors) == 0 or not all(math.isfinite(a) and a > 0 for a in shrink_factors):
        raise InputError(
            f"shrink_factors: expected a non-empty list of finite values > 0, got {shrink_factors}"
        )


def _group_channel_weights(
    channel_weights: torch.Tensor | None, W: torch.Tensor, group_size: int, n_groups: int
) -> torch.Tensor:
    """c: float32 [n_groups, G], zero on the padding of a ragged last group."""
    in_features = W.shape[1]
    if channel_weights is None:
        c = torch.ones(in_features, device=W.device)
    elif channel_weights.shape != (in_features,) or not bool(torch.isfinite(channel_weights).all()):
        raise InputError(
            f"channel_weights: expected finite [{in_features}], got {tuple(channel_weights.shape)}"
        )
    elif bool((channel_weights < 0).any()):
        raise InputError("channel_weights: expected values ≥ 0 (input-channel second moments)")
    else:
        c = channel_weights.to(device=W.device, dtype=torch.float32)
    padded = torch.zeros(n_groups * group_size, device=W.device)
    padded[:in_features] = c
    return padded.view(n_groups, group_size)


def _grouped(W: torch.Tensor, group_size: int, n_groups: int) -> torch.Tensor:
    """W: [out, in] → float32 [out, n_groups, G]; a ragged last group is padded with copies of its last
    weight, which changes neither its absmax nor its min/max (the padding has error weight 0)."""
    W = W.float()
    pad = n_groups * group_size - W.shape[1]
    if pad:
        W = torch.cat([W, W[:, -1:].expand(-1, pad)], dim=1)
    return W.reshape(W.shape[0], n_groups, group_size)


def _fp16_scale(scale: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Clamp to the positive fp16 range and round to fp16 (what is stored)."""
    upper = 2.0**15 if pow2 else FP16_MAX_SCALE
    return scale.clamp(FP16_MIN_SCALE, upper).half()


def _nearest_level(x: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """uint8 index of the nearest of the ascending ``levels``; ties → the level of smaller magnitude.

    Consecutive-integer grids (INT) round arithmetically; grids whose midpoints are multiples of a step h = 2^-k
    (BitMoD, FP) look the code up by j = ⌈x/h⌉ and whether x = j·h (:func:`_step_table`, exact: x/h is a power-of-
    two scaling); other grids (NF4) count the midpoints below x, one comparison pass per midpoint.
    """
    if levels == tuple(float(v) for v in range(int(levels[0]), int(levels[-1]) + 1)):
        q = _round_half_toward_zero(x).clamp(levels[0], levels[-1])
        return (q - levels[0]).to(torch.uint8)
    table = _step_table(levels)
    if table is not None:
        inv_step, first, last, flat = table
        y = x * inv_step
        j = torch.ceil(y).clamp_(first, last)
        tie = (y == j).view(torch.uint8)
        return flat.to(x.device)[(j - first).mul_(2).add_(tie).to(torch.int64)]
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for lo, hi in zip(levels[:-1], levels[1:], strict=True):
        mid = (lo + hi) / 2
        # At a tie (x == mid) step up only for negative midpoints: that is the move towards zero.
        idx += ((x >= mid) if mid < 0 else (x > mid)).view(torch.uint8)  # bool → 0/1 without a cast
    return idx


@functools.lru_cache(maxsize=64)
def _step_table(levels: tuple[float, ...]) -> tuple[float, int, int, torch.Tensor] | None:
    """(1/h, a_0, a_last + 1, table uint8 [2·(a_last + 2 − a_0)]) for midpoints m_k = a_k·h (a_k integers, h = 2^-k,
    k ≤ 4); None if the midpoints are not on such a grid. table[2(j − a_0) + t] = #{k: a_k < j} + t·[j = a_k < 0]:
    x ∈ ((j−1)h, jh) lies above exactly the midpoints a_k < j; x = jh (t = 1) also steps over a negative midpoint
    at j (ties toward zero), as the comparison loop does."""
    mids = [(lo + hi) / 2 for lo, hi in zip(levels[:-1], levels[1:], strict=True)]
    for k in range(5):
        steps = [m * 2**k for m in mids]
        if all(v == int(v) for v in steps) and max(abs(v) for v in steps) <= 4096:
            a = [int(v) for v in steps]
            below = [sum(ak < j for ak in a) for j in range(a[0], a[-1] + 2)]
            table = [[n, n + (j in a and j < 0)] for j, n in zip(range(a[0], a[-1] + 2), below, strict=True)]
            return float(2**k), a[0], a[-1] + 1, torch.tensor(table, dtype=torch.uint8).view(-1)
    return None


def _round_half_toward_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.ceil(x.abs() - 0.5)


def _stored_scale(scale: torch.Tensor, ceiling: torch.Tensor | None, pow2: bool = False) -> torch.Tensor:
    """fp16 as stored: the fp16 rounding, or the nearest point of the 8-bit scale grid below ``ceiling``."""
    return _fp16_scale(scale, pow2) if ceiling is None else snap_scales(scale, ceiling)[1]


def _quantize_symmetric(
    wg: torch.Tensor, dtype: Datatype, shrink: float, ceiling: torch.Tensor | None = None
) -> Candidate:
    """s = α·absmax/max|grid| (MX: rounded up to 2^k), ŵ = s·nearest(w/s). wg: [out, g, G]."""
    scale = wg.abs().amax(-1) * (shrink / dtype.max_abs)
    if dtype.pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scales = _stored_scale(scale, ceiling, dtype.pow2_scale)
    s = scales.float().unsqueeze(-1)
    levels = dtype.distinct_values  # distinct values are codes 0..n−1 in order
    codes = _nearest_level(wg / s, levels)
    w_hat = torch.tensor(levels, dtype=torch.float32, device=wg.device)[codes.long()] * s
    return codes, scales, None, w_hat


def _quantize_asymmetric(
    wg: torch.Tensor, dtype: Datatype, shrink: float, ceiling: torch.Tensor | None = None
) -> Candidate:
    """s = α·(max − min)/(2^b − 1), z = round(−α·min/s), ŵ = (c − z)·s with c = clamp(round(w/s) + z)."""
    qmax = float(2**dtype.bits - 1)
    wmin = wg.amin(-1).clamp(max=0) * shrink
    wmax = wg.amax(-1).clamp(min=0) * shrink
    scales = _stored_scale((wmax - wmin) / qmax, ceiling)
    s = scales.float()
    zero = torch.round(-wmin / s).clamp(0, qmax).unsqueeze(-1)  # integer-valued, exact in fp16
    q = torch.clamp(_round_half_toward_zero(wg / s.unsqueeze(-1)), -zero, qmax - zero)
    codes = q + zero
    return codes.to(torch.uint8), scales, zero.squeeze(-1).half(), (codes - zero) * s.unsqueeze(-1)


def _quantize_candidate(
    wg: torch.Tensor, dtype: Datatype, shrink: float, ceiling: torch.Tensor | None = None
) -> Candidate:
    if dtype.asymmetric:
        return _quantize_asymmetric(wg, dtype, shrink, ceiling)
    return _quantize_symmetric(wg, dtype, shrink, ceiling)


def scale_bound(
    W: torch.Tensor, dtset: DatatypeSet | str, group_size: int | None = 128, shrink_factors: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """The largest scale any candidate of :func:`choose_group_datatypes` can want, float32 [out, n_groups]
    (max over members and shrink factors): what the 8-bit scale grid's ceiling is built from."""
    dtset = _resolve_set(dtset)
    _check_weight(W)
    G = _resolve_group_size(group_size, W.shape[1], dtset)
    wg = _grouped(W, G, -(-W.shape[1] // G))
    alpha = max(float(a) for a in shrink_factors)
    bounds = []
    for dtype in dtset.members:
        if dtype.asymmetric:
            span = wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)
            bounds.append(span * alpha / float(2**dtype.bits - 1))
        else:
            bounds.append(wg.abs().amax(-1) * (alpha / dtype.max_abs))
    return torch.stack(bounds).amax(0)


def choose_group_datatypes(
    W: torch.Tensor,
    dtset: DatatypeSet | str,
    group_size: int | None = 128,
    shrink_factors: Sequence[float] = (1.0,),
    channel_weights: torch.Tensor | None = None,
    scale_ceiling: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantise W choosing, per group, the member type (and shrink factor) of least weighted error.

    W: float [out, in]; group_size: G, or None for per-channel (G = in); a ragged last group is allowed.
    channel_weights: [in] ≥ 0, the c_j of E_t = Σ_j c_j (w_j − ŵ_j)² (None → 1).
    scale_ceiling: float32 [out, n_groups], the 8-bit scale grid's ceiling per group (None: fp16 scales).
    Returns codes uint8 [out, in]; type_ids uint8, scales fp16, zeros fp16 (asymmetric sets): [out, n_groups].
    """
    return _select(W, dtset, group_size, shrink_factors, channel_weights, scale_ceiling, keep_hat=False)[0]


def _select(
    W: torch.Tensor,
    dtset: DatatypeSet | str,
    group_size: int | None,
    shrink_factors: Sequence[float],
    channel_weights: torch.Tensor | None,
    scale_ceiling: torch.Tensor | None,
    keep_hat: bool,
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """:func:`choose_group_datatypes`, plus (``keep_hat``) the chosen Ŵ float32 [out, in]: the candidates' ŵ are
    (tables[t, code] − z)·s, the formula of :func:`cuda_ext.reference.dequantize_codes`, so no re-dequantization."""
    dtset = _resolve_set(dtset)
    _check_weight(W)
    _check_shrink(shrink_factors)
    out_features, in_features = W.shape
    G = _resolve_group_size(group_size, in_features, dtset)
    n_groups = -(-in_features // G)
    wg = _grouped(W, G, n_groups)
    c = _group_channel_weights(channel_weights, W, G, n_groups)
    if scale_ceiling is not None and (
        scale_ceiling.shape != (out_features, n_groups) or any(m.pow2_scale for m in dtset.members)
    ):
        raise InputError(
            f"scale_ceiling: expected [{out_features}, {n_groups}] and a set without power-of-two scales "
            f"({dtset.name}), got {tuple(scale_ceiling.shape)}"
        )
    best: list[torch.Tensor] | None = None  # [err, codes, type_ids, scales, zeros(, ŵ)]
    for type_id, dtype in enumerate(dtset.members):
        for shrink in shrink_factors:
            codes, scales, zeros, w_hat = _quantize_candidate(wg, dtype, float(shrink), scale_ceiling)
            err = ((wg - w_hat).square() * c).sum(-1)  # [out, n_groups]
            zeros = torch.zeros_like(scales) if zeros is None else zeros
            cand = [err, codes, torch.full_like(codes[..., 0], type_id), scales, zeros, *([w_hat] if keep_hat else [])]
            best = cand if best is None else _keep_better(best, cand)
    assert best is not None
    codes, type_ids, scales, zeros = best[1:5]
    hat = best[5].reshape(out_features, -1)[:, :in_features] if keep_hat else None
    return QuantizedWeight(
        codes=codes.reshape(out_features, -1)[:, :in_features].contiguous(),
        type_ids=type_ids,
        scales=scales,
        zeros=zeros if dtset.asymmetric else None,
        tables=dtset.tables().to(W.device),
        bits=dtset.bits,
        group_size=G,
        in_features=in_features,
    ), hat


def _keep_better(best: list[torch.Tensor], cand: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per group, keep ``cand`` where its error (entry 0) is strictly lower (ties keep the earlier one)."""
    better = cand[0] < best[0]  # [out, n_groups]
    return [
        torch.where(better if b.dim() == 2 else better.unsqueeze(-1), n, b)
        for b, n in zip(best, cand, strict=True)
    ]


def quantize_dequantize(
    W: torch.Tensor,
    dtset: DatatypeSet | str,
    group_size: int | None = 128,
    shrink_factors: Sequence[float] = (1.0,),
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake quantisation: Ŵ [out, in] in W.dtype, exactly what the packed format dequantises to."""
    w_hat = _select(W, dtset, group_size, shrink_factors, channel_weights, None, keep_hat=True)[1]
    assert w_hat is not None
    return w_hat.to(W.dtype)


def bits_per_weight(
    dtset: DatatypeSet | str, group_size: int | None, in_features: int | None = None
) -> float:
    """Exact bits/weight of the information stored: b + n_groups·(16 + ⌈log2 n_types⌉ + 16·[zero]) / in.

    16 = fp16 scale (and fp16 zero point for asymmetric sets); the type id is counted at its packed width
    (2 bits for a 4-member set, 0 for one type). Without ``in_features`` groups are assumed full. E.g.
    BitMoD-4 at G = 128: 4 + 18/128 = 4.140625. Our tensors store the type id in a uint8 and pad planes to
    32 codes: see :meth:`quant.pack.PackedWeight.storage_bits_per_weight` for the bytes actually held.
    """
    dtset = _resolve_set(dtset)
    if group_size is None and in_features is None:
        raise InputError("in_features: required when group_size is None (per-channel)")
    G = group_size if group_size is not None else in_features
    assert G is not None
    n = in_features if in_features is not None else G
    type_id_bits = math.ceil(math.log2(len(dtset.members)))
    meta = 16 + type_id_bits + (16 if dtset.asymmetric else 0)
    return dtset.bits + (-(-n // G)) * meta / n


def paper_bits_per_weight(dtset: DatatypeSet | str, group_size: int) -> float:
    """The BitMoD paper's accounting: b + 8/G (8 bits of metadata per group; 4.0625 / 3.0625 at G = 128)."""
    return _resolve_set(dtset).bits + PAPER_METADATA_BITS / group_size
