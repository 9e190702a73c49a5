import torch

from compress.prune.scores import fluctuation_scores, magnitude_scores, standardize, unit_scores, wanda_scores


def _data():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])  # [out=2, C=3]
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 3.0, 2.0]])  # [N=3, C=3]
    return w, x


def test_wifv_by_hand():
    w, x = _data()
    var = x.double().var(0)  # sample variance: [1, 3, 0]
    s = fluctuation_scores("WIFV", w, var, (x.double() ** 2).mean(0))
    # ‖W[:, j]‖² = [10, 5, 1]
    assert torch.allclose(s, torch.tensor([10.0, 15.0, 0.0], dtype=torch.float64))


def test_ifv_and_wifn_by_hand():
    w, x = _data()
    var = x.double().var(0)
    mean_sq = (x.double() ** 2).mean(0)  # [14/3, 3, 4]
    assert torch.allclose(fluctuation_scores("IFV", w, var, mean_sq), var)
    wifn = fluctuation_scores("WIFN", w, var, mean_sq)
    expected = torch.tensor(
        [(1 + 3) / 2 * (14 / 3) ** 0.5, (2 + 1) / 2 * 3**0.5, (0 + 1) / 2 * 2.0], dtype=torch.float64
    )
    assert torch.allclose(wifn, expected)


def test_wanda_and_magnitude_by_hand():
    w, x = _data()
    sq = (x.double() ** 2).sum(0)  # [14, 9, 12]
    expected = torch.tensor([2 * 14**0.5, 1.5 * 3.0, 0.5 * 12**0.5], dtype=torch.float64)
    assert torch.allclose(wanda_scores(w, sq), expected)
    assert torch.allclose(magnitude_scores(w), torch.tensor([10**0.5, 5**0.5, 1.0], dtype=torch.float64))


def test_standardize_zero_mean_unit_std_and_constant_input():
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std()) - 1) < 1e-12
    assert torch.equal(standardize(torch.ones(4)), torch.zeros(4))


def test_unit_scores_are_means_of_contiguous_blocks():
    s = torch.arange(12, dtype=torch.float64)  # 3 units of width 4
    assert torch.equal(unit_scores(s, 3), torch.tensor([1.5, 5.5, 9.5], dtype=torch.float64))
