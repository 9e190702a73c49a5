"""The pure mapping onto llama.cpp: architecture choice, folded constants, RoPE row order."""

import pytest
import torch

from compress.export.layout import STUB_FFN, LayerShape, is_uniform, plan_layers, rope_permute
from quant.errors import InputError


def _vec(value: float) -> torch.Tensor:
    return torch.full((4,), value)


def test_uniform_only_when_all_layers_match_and_nothing_is_skipped():
    assert is_uniform([LayerShape(6, 3, 96), LayerShape(6, 3, 96)])
    assert not is_uniform([LayerShape(6, 3, 96), LayerShape(4, 2, 96)])
    assert not is_uniform([LayerShape(6, 3, 96), LayerShape(0, 0, 96)])


def test_constants_of_skipped_blocks_fold_into_the_previous_kept_output_bias():
    shapes = [
        LayerShape(6, 3, 96, attn_bias=_vec(1.0), mlp_bias=_vec(2.0)),
        LayerShape(0, 0, 96, attn_bias=_vec(10.0), mlp_bias=None),  # skipped attention → layer 0's MLP bias
        LayerShape(0, 0, 0, attn_bias=_vec(100.0), mlp_bias=_vec(1000.0)),  # both skipped → layer 1's MLP bias
        LayerShape(6, 3, 0, attn_bias=None, mlp_bias=_vec(5.0)),  # skipped MLP next to attention → stub
    ]
    plans = plan_layers(shapes)
    assert [(p.n_head, p.n_kv, p.n_ff) for p in plans] == [(6, 3, 96), (0, 0, 96), (0, 0, 0), (6, 3, STUB_FFN)]
    assert torch.equal(plans[0].attn_out_bias, _vec(1.0))
    assert torch.equal(plans[0].ffn_down_bias, _vec(12.0))  # 2 + 10
    assert plans[1].attn_out_bias is None
    assert torch.equal(plans[1].ffn_down_bias, _vec(1100.0))  # no own bias: 100 + 1000
    assert plans[2].attn_out_bias is None and plans[2].ffn_down_bias is None
    assert plans[3].mlp_stub and torch.equal(plans[3].ffn_down_bias, _vec(5.0))
    # the residual stream gets the same total at the end of every kept block
    total_in = sum(float(t[0]) for s in shapes for t in (s.attn_bias, s.mlp_bias) if t is not None)
    total_out = sum(float(t[0]) for p in plans for t in (p.attn_out_bias, p.ffn_down_bias) if t is not None)
    assert total_in == total_out


def test_zero_constants_need_no_bias_and_a_leading_constant_is_refused():
    plans = plan_layers([LayerShape(6, 3, 96), LayerShape(0, 0, 0, attn_bias=torch.zeros(4))])
    assert plans[0].ffn_down_bias is None
    with pytest.raises(InputError, match="layer 0"):
        plan_layers([LayerShape(0, 0, 96, attn_bias=_vec(1.0))])


def _rope_half(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """Hugging Face RoPE on one head vector x [d]: pairs (i, i + d/2)."""
    d = x.shape[0]
    theta = pos * base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    a, b = x[: d // 2], x[d // 2 :]
    return torch.cat([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()])


def _rope_interleaved(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """ggml RoPE (mode NORM) on one head vector x [d]: pairs (2i, 2i + 1)."""
    d = x.shape[0]
    theta = pos * base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2] = a * theta.cos() - b * theta.sin()
    out[1::2] = a * theta.sin() + b * theta.cos()
    return out


def test_rope_permute_turns_rotate_half_into_interleaved_pairs():
    head_dim, heads, hidden = 8, 3, 5
    w = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    permuted = rope_permute(w, head_dim)
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        hf = _rope_half(w[rows] @ x, pos=7)
        gg = _rope_interleaved(permuted[rows] @ x, pos=7)
        # same rotated vector, the rows of each head in interleaved order: q·k products are unchanged
        assert torch.allclose(rope_permute(hf[None].T, head_dim).T[0], gg)
    assert torch.equal(rope_permute(torch.arange(8.0), 8), torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7]))
