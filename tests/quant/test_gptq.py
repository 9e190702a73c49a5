"""GPTQ with per-group datatypes: equals an independent textbook GPTQ for one datatype, reduces to round-to-nearest
with an identity (or diagonal) Hessian, lowers the output error on correlated inputs, keeps the packed format."""

import pytest
import torch

from quant.errors import InputError
from quant.gptq import gptq_quantize
from quant.select import choose_group_datatypes
from quant.storage import encode_scales, expand_ceiling, scale_block_ceiling


def _correlated_inputs(n_in: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    return (torch.randn(n, n_in, generator=g) @ mix) * torch.linspace(0.2, 3.0, n_in)


def _hessian(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return 2 * X.T @ X / X.shape[0]


def _reference_gptq_int4_asym(W: torch.Tensor, H: torch.Tensor, G: int, damp: float) -> torch.Tensor:
    """Textbook GPTQ (OBQ form): explicit inverse Hessian, downdated after every column; INT4 with a zero point,
    group parameters from the current weights at the start of each group. Returns Ŵ [out, in] (float64)."""
    W = W.double().clone()
    H = H.double() + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    W_hat = torch.zeros_like(W)
    n = W.shape[1]
    for j in range(n):
        if j % G == 0:
            block = W[:, j : j + G].float()
            lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            scale = ((hi - lo) / 15).clamp(min=2**-24).half().float()
            zero = torch.round(-lo / scale).clamp(0, 15)
        q = torch.clamp(torch.round(W[:, j].float() / scale) + zero, 0, 15)
        W_hat[:, j] = ((q - zero) * scale).double()
        err = (W[:, j] - W_hat[:, j]) / Hinv[j, j]
        W[:, j + 1 :] -= err.unsqueeze(1) * Hinv[j, j + 1 :].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return W_hat


def test_single_datatype_equals_reference_gptq() -> None:
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    H = _hessian(_correlated_inputs(64))
    ours = gptq_quantize(W, H, "int4_asym", group_size=16, damp=0.01, block_size=8).dequantize().double()
    reference = _reference_gptq_int4_asym(W, H, 16, 0.01)
    # same codes except where float64 round-off lands a value on the other side of a rounding midpoint
    assert float((ours - reference).abs().max()) < 1e-6


@pytest.mark.parametrize("name", ["bitmod4", "bitmod3", "int4_asym", "nf4", "ant4", "int3_sym"])
def test_identity_hessian_is_round_to_nearest(name: str) -> None:
    torch.manual_seed(1)
    W = torch.randn(24, 96)
    ours = gptq_quantize(W, torch.eye(96), name, group_size=32)
    rtn = choose_group_datatypes(W, name, 32)
    assert torch.equal(ours.codes, rtn.codes) and torch.equal(ours.type_ids, rtn.type_ids)
    assert torch.equal(ours.scales, rtn.scales)


def test_diagonal_hessian_with_act_order_is_round_to_nearest_for_one_type() -> None:
    torch.manual_seed(2)
    W = torch.randn(8, 80)  # ragged last group of 16
    H = torch.diag(torch.rand(80, dtype=torch.float64) + 0.1)
    ours = gptq_quantize(W, H, "nf4", group_size=32, act_order=True)
    assert torch.equal(ours.dequantize(), choose_group_datatypes(W, "nf4", 32).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_error_compensation_lowers_the_output_error(act_order: bool) -> None:
    torch.manual_seed(3)
    W = torch.randn(32, 128)
    X = _correlated_inputs(128)
    H = _hessian(X)
    ours = gptq_quantize(W, H, "bitmod4", group_size=32, act_order=act_order)
    rtn = choose_group_datatypes(W, "bitmod4", 32)
    err = float(((W - ours.dequantize()) @ X.T).square().sum())
    assert err < 0.8 * float(((W - rtn.dequantize()) @ X.T).square().sum())
    assert ours.type_ids.shape == (32, 4) and set(ours.type_ids.unique().tolist()) <= {0, 1, 2, 3}


def test_eight_bit_scale_grid_is_respected() -> None:
    torch.manual_seed(4)
    W = torch.randn(16, 64)
    hi = scale_block_ceiling(torch.full((16, 2), 0.5))
    ceiling = expand_ceiling(hi, 16)
    qw = gptq_quantize(W, _hessian(_correlated_inputs(64)), "bitmod4", 32, scale_ceiling=ceiling)
    encode_scales(qw.scales, ceiling)  # raises if any scale is off the grid


def test_bad_hessian_and_mixed_asymmetric_sets_are_rejected() -> None:
    with pytest.raises(InputError, match="H: expected"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), "bitmod4", 8)
    with pytest.raises(InputError, match="not positive definite"):
        gptq_quantize(torch.randn(4, 8), -torch.eye(8), "bitmod4", 8, damp=0.0)


@pytest.mark.parametrize("name", ["bitmod4", "bitmod3", "int4_asym", "int3_sym", "nf4", "ant4"])
def test_group_rounder_equals_quantize_column(name: str) -> None:
    """The per-group precomputed rounding of the GPTQ loop is exactly :func:`quantize_column`, ties included."""
    from quant.datatypes import get_datatype_set
    from quant.gptq import _GroupRounder, _midpoints, quantize_column

    torch.manual_seed(2)
    dtset = get_datatype_set(name)
    qw = choose_group_datatypes(torch.randn(64, 32), dtset, 32)
    type_ids, scales, zeros = qw.type_ids[:, 0], qw.scales[:, 0], None if qw.zeros is None else qw.zeros[:, 0]
    tables, mids = dtset.tables(), _midpoints(dtset)
    rounder = _GroupRounder(type_ids, scales, zeros, tables, mids)
    s = scales.double()
    row_mids = mids[type_ids.long()].double()
    finite = torch.where(torch.isinf(row_mids), torch.zeros_like(row_mids), row_mids)
    columns = [torch.randn(64).double() * 3, finite[:, 0] * s, finite[:, -1] * s, finite[:, 3] * s, torch.zeros(64)]
    for w in columns:
        codes, q = rounder(w)
        ref_codes, ref_q = quantize_column(w, type_ids, scales, zeros, tables, mids)
        assert torch.equal(codes, ref_codes) and torch.equal(q, ref_q)
