"""AWQ scale and clip search: never worse than no scaling / no clipping on the sampled error, and scaling helps
when a few input channels carry large activations (the case AWQ is built for)."""

import pytest
import torch

from quant.awq import apply_clip, search_clip, search_scales
from quant.errors import InputError
from quant.select import quantize_dequantize


def _q(w: torch.Tensor) -> torch.Tensor:
    return quantize_dequantize(w, "int3_asym", 32)


def _output_error(W: torch.Tensor, W_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (W - W_hat).T).square().sum())


def _outlier_inputs(n: int = 256, n_in: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    x[:, :4] *= 20.0  # salient channels
    return x


def test_scale_search_beats_plain_quantization_on_salient_channels() -> None:
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    x = _outlier_inputs()
    s, alpha = search_scales(x, [W], [_q], n_grid=10)
    assert s.shape == (64,) and alpha > 0
    assert bool((s[:4] > s[4:].max()).all())  # the salient channels get the largest scales
    scaled = _q(W * s) / s
    assert _output_error(W, scaled, x) < 0.9 * _output_error(W, _q(W), x)


def test_scale_search_is_never_worse_than_no_scaling() -> None:
    torch.manual_seed(1)
    weights = [torch.randn(16, 32), torch.randn(8, 32)]
    x = torch.randn(64, 32)  # no salient channels: α = 0 (s = 1) may well win
    s, _ = search_scales(x, weights, [_q, _q], n_grid=5)
    scaled = sum(_output_error(w, _q(w * s) / s, x) for w in weights)
    assert scaled <= sum(_output_error(w, _q(w), x) for w in weights) * (1 + 1e-6)


def test_clip_search_never_worse_per_group_and_clip_is_applied_groupwise() -> None:
    torch.manual_seed(2)
    W = torch.randn(16, 72)  # ragged last group of 8
    W[0, 3] = 12.0  # an outlier weight: clipping it may pay off
    x = torch.randn(128, 72)
    max_val = search_clip(W, x, _q, 32, n_grid=10)
    assert max_val.shape == (16, 3)
    org_max = torch.stack([W[:, i : i + 32].abs().amax(1) for i in range(0, 72, 32)], 1)
    assert bool((max_val <= org_max).all()) and bool((max_val >= 0.5 * org_max - 1e-6).all())
    clipped = apply_clip(W, max_val, 32)
    assert float(clipped.abs().max()) <= float(max_val.max())
    assert _output_error(W, _q(clipped), x) <= _output_error(W, _q(W), x) * (1 + 1e-6)


def test_apply_clip_by_hand() -> None:
    W = torch.tensor([[3.0, -4.0, 1.0, -1.0]])
    assert torch.equal(apply_clip(W, torch.tensor([[2.0, 0.5]]), 2), torch.tensor([[2.0, -2.0, 0.5, -0.5]]))


def test_shape_errors_name_the_input() -> None:
    with pytest.raises(InputError, match="x: expected"):
        search_scales(torch.randn(4, 8), [torch.randn(3, 9)], [_q])
