"""Correlation math against hand cases and scipy (an independent implementation)."""

import math

import pytest
import torch
from scipy import stats

from compress.nas.rank import average_ranks, kendall_tau_b, pearson, spearman


def test_pearson_hand_cases():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert pearson(a, 2 * a + 5) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([1.0, -2.0, 1.0])) == pytest.approx(0.0)
    # (1,2,3,4) vs (1,3,2,4): cov 4/4... by hand r = 0.8
    assert pearson(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert pearson(a, torch.ones(3)) == 0.0  # constant: defined as 0, not NaN


def test_pearson_is_scale_invariant_and_flattens():
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert pearson(g, 1e-6 * g.T.contiguous().T) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pearson(torch.ones(3), torch.ones(4))


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]


@pytest.mark.parametrize("seed", range(5))
def test_spearman_and_kendall_match_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 8, (30,), generator=g).double()  # with ties
    y = x + torch.randn(30, generator=g, dtype=torch.float64) * 3
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_kendall_hand_case():
    # pairs of (1,2,3) vs (1,3,2): concordant 2, discordant 1 → τ = 1/3
    assert kendall_tau_b(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2])) == pytest.approx(1 / 3)
    assert math.isclose(kendall_tau_b(torch.arange(5.0), -torch.arange(5.0)), -1.0)
