"""The candidate space: exact parameter costs (against the realised model), windows, GQA groups, operators."""

import random

import pytest
import torch

from compress.adapters import arch_for
from compress.candidates import DenseCache
from compress.nas.space import Candidate, SpaceSpec, crossover, mutate, random_candidate, repair
from compress.prune.pruner import prunable_parameters
from tests.conftest import build_tiny

SPEC = SpaceSpec(n_layers=8, n_kv=3, group=2, head_dim=8, hidden=48, intermediate=96, mlp_step=16)
CAL = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(3))


def test_unit_costs_by_hand():
    assert SPEC.attn_unit == 48 * 8 * (2 * 2 + 2)  # g query heads + 1 k + 1 v head rows, g o_proj column blocks
    assert SPEC.mlp_unit == 3 * 48
    assert SPEC.mlp_widths() == [16, 32, 48, 64, 80, 96]
    full = Candidate((3,) * 8, (96,) * 8)
    assert SPEC.params(full) == SPEC.dense_params() == 8 * (3 * SPEC.attn_unit + 96 * SPEC.mlp_unit)
    one = Candidate((3,) * 7 + (2,), (96,) * 7 + (0,))
    # one group fewer (+ its compensation bias of hidden), the MLP removed entirely (no bias: nothing left)
    assert SPEC.params(one) == SPEC.dense_params() - SPEC.attn_unit + 48 - 96 * SPEC.mlp_unit


def test_check_rejects_off_grid_and_early_skips():
    SPEC.check(Candidate((3,) * 8, (96,) * 7 + (0,)))
    with pytest.raises(ValueError, match="layer 0"):
        SPEC.check(Candidate((3,) * 8, (0,) + (96,) * 7))
    with pytest.raises(ValueError, match="multiple of 16"):
        SPEC.check(Candidate((3,) * 8, (50,) + (96,) * 7))
    with pytest.raises(ValueError, match="KV groups"):
        SPEC.check(Candidate((4,) + (3,) * 7, (96,) * 8))


@pytest.mark.parametrize("seed", range(10))
def test_operators_stay_in_the_window_and_the_space(seed):
    rng = random.Random(seed)
    lo, hi = SPEC.window(0.7, 0.03)
    a = random_candidate(SPEC, rng, 0.7, lo, hi, p_skip=0.3)
    b = random_candidate(SPEC, rng, 0.7, lo, hi, p_skip=0.3)
    for cand in (a, b, crossover(SPEC, a, b, rng, lo, hi), mutate(SPEC, a, rng, 0.5, lo, hi)):
        SPEC.check(cand)
        assert lo <= SPEC.params(cand) <= hi


def test_repair_fails_loudly_when_the_window_is_unreachable():
    with pytest.raises(ValueError, match="window"):
        repair(SPEC, Candidate((3,) * 8, (96,) * 8), 1, 2, random.Random(0))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_realised_candidates_have_exactly_the_counted_parameters(family):
    model = build_tiny(family, num_hidden_layers=6)
    engine = DenseCache(model, arch_for(model.config), CAL, batch_size=4).nas(mlp_step=16)
    rng = random.Random(1)
    lo, hi = engine.spec.window(0.6, 0.05)
    for _ in range(4):
        cand = random_candidate(engine.spec, rng, 0.6, lo, hi, p_skip=0.3)
        pruned = engine.realize(cand).model
        assert prunable_parameters(pruned, arch_for(pruned.config)) == engine.spec.params(cand)
        layers = pruned.model.layers
        for layer, k, c in zip(layers, cand.attn, cand.mlp, strict=True):
            if k:  # whole KV groups: g query heads per kept KV head
                assert layer.self_attn.q_proj.out_features == 2 * layer.self_attn.k_proj.out_features == 2 * k * 8
            if c:
                assert layer.mlp.down_proj.in_features == c
    flap = engine.flap_candidate(0.6, 0.05)
    assert lo <= engine.spec.params(flap) <= hi and all(flap.attn) and all(flap.mlp)
