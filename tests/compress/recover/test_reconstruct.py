"""Least-squares reconstruction on tiny models (compress.recover.reconstruct)."""

from __future__ import annotations

import copy

import torch

from compress.adapters import arch_for, decoder_layers, linear_at
from compress.prune.pruner import apply_masks, collect_statistics, plan_masks
from compress.prune.surgery import compensation_bias
from compress.recipe import PruneConfig
from compress.recover.reconstruct import reconstruct_model
from tests.conftest import build_tiny


def _ids(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (n, 32), generator=torch.Generator().manual_seed(5))


def _plan(model, ratio: float = 0.4):
    arch = arch_for(model.config)
    cfg = PruneConfig(ratio=ratio, structure="UL-UM")
    stats = collect_statistics(model, arch, _ids(), 4)
    attn, mlp = plan_masks(model, arch, cfg, stats)
    return arch, cfg, stats, attn, mlp


def _hidden_error(model, dense, ids) -> float:
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        b = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float(((a - b) ** 2).sum() / (b**2).sum())


def test_all_units_kept_leaves_the_model_bit_identical(token_batch) -> None:
    model, reference = build_tiny("llama"), build_tiny("llama")
    arch = arch_for(model.config)
    layers = decoder_layers(model, arch)
    attn = [torch.ones(3, dtype=torch.bool)] * len(layers)
    mlp = [torch.ones(96, dtype=torch.bool)] * len(layers)
    records = reconstruct_model(model, arch, _ids(), attn, mlp, 0.01, [None] * len(layers), 4)
    assert records == [{}, {}]
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_least_squares_beats_bias_compensation_on_calibration_data() -> None:
    dense = build_tiny("llama", num_hidden_layers=3)
    bias_model, ls_model = copy.deepcopy(dense), copy.deepcopy(dense)
    arch, cfg, stats, attn, mlp = _plan(dense)
    apply_masks(bias_model, arch, cfg, stats, attn, mlp)
    records = reconstruct_model(ls_model, arch, _ids(), attn, mlp, 1e-3, stats, 4)
    assert all(0 <= r["mlp"]["residual"] < 1 and r["mlp"]["alpha"] == 1e-3 for r in records)
    ids = _ids()
    assert _hidden_error(ls_model, dense, ids) < 0.8 * _hidden_error(bias_model, dense, ids)
    # same shapes as the plain surgery (the refit only changes values, and gives every consumer a bias)
    for a, b in zip(decoder_layers(ls_model, arch), decoder_layers(bias_model, arch), strict=True):
        assert linear_at(a, arch.down).weight.shape == linear_at(b, arch.down).weight.shape


def test_infinite_ridge_reduces_to_flap_compensation_in_the_first_layer() -> None:
    dense = build_tiny("llama")
    model = copy.deepcopy(dense)
    arch, cfg, stats, attn, mlp = _plan(dense)
    reconstruct_model(model, arch, _ids(), attn, mlp, float("inf"), stats, 4)
    o_dense = linear_at(decoder_layers(dense, arch)[0], arch.o)
    keep = attn[0].repeat_interleave(2 * 8)
    expected = compensation_bias(o_dense.weight, stats[0]["o"].mean, keep, o_dense.bias)
    got = linear_at(decoder_layers(model, arch)[0], arch.o)
    assert torch.equal(got.weight, o_dense.weight[:, keep])
    assert torch.allclose(got.bias.double(), expected, atol=1e-5)
