"""Per-group datatype selection: hand cases, a slow per-group reference, bits per weight."""

import math

import pytest
import torch

from quant.datatypes import Datatype, get_datatype_set
from quant.errors import InputError
from quant.select import bits_per_weight, choose_group_datatypes, paper_bits_per_weight, quantize_dequantize

ER_POS, ER_NEG, EA_POS, EA_NEG = range(4)


def _row(values: list[float], width: int = 8) -> torch.Tensor:
    return torch.tensor([values + [0.0] * (width - len(values))])


def _dequant(W: torch.Tensor, name: str, group_size: int | None = None, **kw) -> torch.Tensor:
    return quantize_dequantize(W, name, group_size, **kw)


# ---- slow per-group, per-element reference (independent of quant.select) -----------------------------


def _nearest(x: float, levels: list[float]) -> int:
    """Nearest level by brute force; ties → smaller magnitude."""
    return min(range(len(levels)), key=lambda k: (abs(x - levels[k]), abs(levels[k])))


def _slow_candidate(w: torch.Tensor, dtype: Datatype, shrink: float) -> tuple[list[int], float, float]:
    """(codes, fp16 scale, zero) of one group w [n] for one type and shrink factor."""
    if dtype.asymmetric:
        qmax = 2**dtype.bits - 1
        lo, hi = min(float(w.min()), 0.0) * shrink, max(float(w.max()), 0.0) * shrink
        s = float(torch.tensor(max((hi - lo) / qmax, 2.0**-24)).half())
        z = float(min(max(round(-lo / s), 0), qmax))
        xs = (w / torch.tensor(s)).tolist()
        return [_nearest(x, [c - z for c in range(qmax + 1)]) for x in xs], s, z
    scale = float(w.abs().max()) * shrink / dtype.max_abs
    if dtype.pow2_scale:
        scale = 2.0 ** math.ceil(math.log2(scale))
    s = float(torch.tensor(max(scale, 2.0**-24)).half())
    levels = list(dtype.distinct_values)
    return [_nearest(x, levels) for x in (w / torch.tensor(s)).tolist()], s, 0.0


def _slow_choose(W, dtset, G, shrinks, c) -> tuple[list, list, list, list]:
    codes, type_ids, scales, zeros = [], [], [], []
    for w_row in W:
        for g0 in range(0, W.shape[1], G):
            w, cw = w_row[g0 : g0 + G], c[g0 : g0 + G]
            best = None
            for t, dtype in enumerate(dtset.members):
                for shrink in shrinks:
                    q, s, z = _slow_candidate(w, dtype, shrink)
                    w_hat = (torch.tensor(dtype.values)[q] - z) * torch.tensor(s)
                    err = float(((w - w_hat) ** 2 * cw).sum())
                    if best is None or err < best[0]:
                        best = (err, q, t, s, z)
            assert best is not None
            codes += best[1]
            type_ids.append(best[2])
            scales.append(best[3])
            zeros.append(best[4])
    return codes, type_ids, scales, zeros


@pytest.mark.parametrize(
    ("name", "G", "shrinks", "weighted"),
    [
        ("bitmod4", 16, (1.0,), False),
        ("bitmod3", 16, (1.0, 0.9), True),
        ("int4_asym", 16, (1.0, 0.8), True),
        ("nf4", 20, (1.0,), False),
        ("ant3", 33, (1.0,), True),
        ("mxfp4", 32, (1.0, 0.7), False),
    ],
)
def test_vectorised_equals_slow_per_group_loop(name: str, G: int, shrinks: tuple, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    W = torch.randn(3, 70, generator=gen) * torch.rand(3, 1, generator=gen)
    c = torch.rand(70, generator=gen) * 3 if weighted else torch.ones(70)
    qw = choose_group_datatypes(W, name, G, shrinks, c if weighted else None)
    codes, type_ids, scales, zeros = _slow_choose(W, get_datatype_set(name), G, shrinks, c)
    assert qw.codes.flatten().tolist() == codes
    assert qw.type_ids.flatten().tolist() == type_ids
    assert qw.scales.flatten().tolist() == scales
    assert (qw.zeros.flatten().tolist() if qw.zeros is not None else [0.0] * len(zeros)) == zeros


# ---- hand cases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected_type"),
    [
        ([12.0, 10.0, -3.0], ER_POS),  # s = 1 for ER: exact; EA (s = .75) and ER− miss 10
        ([-12.0, -10.0, 3.0], ER_NEG),
        ([16.0, 12.0, 8.0, -3.0], EA_POS),  # s = 1 for EA: exact; ER (s = 4/3) cannot hit 3 or 8 exactly
        ([-16.0, -12.0, -8.0, 3.0], EA_NEG),
    ],
)
def test_bitmod4_picks_the_obvious_type(values: list[float], expected_type: int) -> None:
    W = _row(values)
    qw = choose_group_datatypes(W, "bitmod4", group_size=8)
    assert qw.type_ids.tolist() == [[expected_type]]
    assert torch.equal(qw.dequantize(), W), "the chosen type represents the group exactly"


def test_ties_round_to_smaller_magnitude() -> None:
    # FP4 with absmax 12 → s = 1; every other entry sits exactly between two grid values.
    W = _row([12.0, 5.0, -5.0, 7.0, -7.0, 0.5, -0.5, 10.0, -10.0, 2.5, -2.5, 1.5], width=12)
    expected = _row([12.0, 4.0, -4.0, 6.0, -6.0, 0.0, 0.0, 8.0, -8.0, 2.0, -2.0, 1.0], width=12)
    assert torch.equal(_dequant(W, "fp4"), expected)


def test_asymmetric_int_scale_zero_point_and_ties() -> None:
    # min −5, max 10 → s = 15/15 = 1, z = 5; ±2.5 are ties → ±2.
    W = _row([-5.0, 10.0, 2.5, -2.5, 0.0, 3.0])
    qw = choose_group_datatypes(W, "int4_asym", group_size=None)
    assert qw.scales.tolist() == [[1.0]] and qw.zeros is not None and qw.zeros.tolist() == [[5.0]]
    assert qw.codes[0, :6].tolist() == [0, 15, 7, 3, 5, 8]
    assert torch.equal(qw.dequantize(), _row([-5.0, 10.0, 2.0, -2.0, 0.0, 3.0]))


def test_activation_aware_weights_change_the_choice() -> None:
    # Unweighted, EA+ (s = .75) has the least error (2); weighting channel 1 or 2 makes ER+/ER− win (4).
    W = _row([12.0, 10.0, -10.0])
    c_ch1 = torch.tensor([1.0, 100.0, 1.0, 1, 1, 1, 1, 1])
    c_ch2 = torch.tensor([1.0, 1.0, 100.0, 1, 1, 1, 1, 1])
    assert choose_group_datatypes(W, "bitmod4", 8).type_ids.item() == EA_POS
    assert choose_group_datatypes(W, "bitmod4", 8, channel_weights=c_ch1).type_ids.item() == ER_POS
    assert choose_group_datatypes(W, "bitmod4", 8, channel_weights=c_ch2).type_ids.item() == ER_NEG


def test_ragged_last_group_is_quantised_on_its_own() -> None:
    W = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    W[:, 96:] *= 100  # the ragged group (4 weights) has its own, larger scale
    qw = choose_group_datatypes(W, "bitmod4", group_size=32)
    assert qw.codes.shape == (4, 100) and qw.scales.shape == qw.type_ids.shape == (4, 4)
    alone = choose_group_datatypes(W[:, 96:], "bitmod4", group_size=32)
    assert torch.equal(qw.dequantize()[:, 96:], alone.dequantize())


def test_per_channel_is_one_group_per_row() -> None:
    W = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    qw = choose_group_datatypes(W, "int3_asym", group_size=None)
    assert qw.group_size == 40 and qw.scales.shape == (5, 1)
    assert torch.equal(qw.dequantize(), _dequant(W, "int3_asym", 40))


def test_zero_groups_and_fp16_scales() -> None:
    W = torch.zeros(2, 16)
    W[1, :8] = torch.linspace(-1, 1, 8)
    for name in ("bitmod4", "int4_asym", "nf4"):
        qw = choose_group_datatypes(W, name, 8)
        assert qw.scales.dtype == torch.float16
        assert torch.equal(qw.dequantize()[:, 8:], torch.zeros(2, 8)) and qw.dequantize()[0].abs().sum() == 0


def test_mxfp4_scales_are_powers_of_two_without_clipping() -> None:
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    qw = choose_group_datatypes(W, "mxfp4", 32)
    log2 = torch.log2(qw.scales.float())
    assert torch.equal(log2, log2.round())
    absmax = W.view(4, 2, 32).abs().amax(-1)
    assert bool((absmax / qw.scales.float() <= 6).all()) and bool((absmax / qw.scales.float() > 3).all())


def test_quantize_dequantize_keeps_dtype() -> None:
    W = torch.randn(3, 64, dtype=torch.bfloat16)
    assert _dequant(W, "bitmod3", 32).dtype == torch.bfloat16


# ---- bits per weight -------------------------------------------------------------------------------------


def test_bits_per_weight() -> None:
    assert bits_per_weight("bitmod4", 128) == 4 + 18 / 128
    assert bits_per_weight("bitmod3", 128) == 3 + 18 / 128
    assert bits_per_weight("int4_sym", 128) == 4 + 16 / 128  # one type: no type id
    assert bits_per_weight("ant4", 128) == 4 + 17 / 128  # two types: 1-bit id
    assert bits_per_weight("int4_asym", 128) == 4 + 32 / 128  # fp16 scale + fp16 zero
    assert bits_per_weight("bitmod4", 32, in_features=100) == 4 + 4 * 18 / 100  # ragged: 4 groups
    assert bits_per_weight("bitmod4", None, in_features=4096) == 4 + 18 / 4096
    assert paper_bits_per_weight("bitmod4", 128) == 4.0625
    assert paper_bits_per_weight("bitmod3", 128) == 3.0625


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"W": torch.tensor([1.0, float("nan")]).view(1, 2)}, "W: expected finite"),
        ({"W": torch.randn(8)}, "W: expected"),
        ({"W": torch.ones(2, 8, dtype=torch.int32)}, "W: expected"),
        ({"group_size": 0}, "group_size"),
        ({"shrink_factors": ()}, "shrink_factors"),
        ({"shrink_factors": (1.0, -0.5)}, "shrink_factors"),
        ({"channel_weights": torch.ones(7)}, "channel_weights"),
        ({"channel_weights": -torch.ones(8)}, "channel_weights"),
        ({"dtset": "mxfp4", "group_size": 128}, "group_size.*mxfp4.*32"),
        ({"dtset": "nope"}, "dtset_name"),
    ],
)
def test_bad_input_raises_input_error(kwargs: dict, match: str) -> None:
    args = {"W": torch.randn(2, 8), "dtset": "bitmod4", "group_size": 4} | kwargs
    with pytest.raises(InputError, match=match):
        choose_group_datatypes(**args)


def test_bits_per_weight_per_channel_needs_in_features() -> None:
    with pytest.raises(InputError, match="in_features"):
        bits_per_weight("bitmod4", None)


# ---- the fast nearest-level lookup equals the comparison loop; fake quantisation equals dequantize ----------------


def _nearest_by_comparison(x: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """One comparison per midpoint; a tie steps up only past a negative midpoint (towards zero)."""
    idx = torch.zeros(x.shape, dtype=torch.int64)
    for lo, hi in zip(levels[:-1], levels[1:], strict=True):
        mid = (lo + hi) / 2
        idx += (x >= mid) if mid < 0 else (x > mid)
    return idx


@pytest.mark.parametrize("name", ["bitmod4", "bitmod3", "fp4", "fp3", "ant4", "nf4", "mxfp4"])
def test_nearest_level_lookup_equals_comparisons_at_ties_and_beyond_the_grid(name: str) -> None:
    from quant.select import _nearest_level

    torch.manual_seed(0)
    for dtype in get_datatype_set(name).members:
        levels = dtype.distinct_values
        mids = torch.tensor([(a + b) / 2 for a, b in zip(levels[:-1], levels[1:], strict=True)])
        below = torch.nextafter(mids, torch.tensor(-math.inf))
        above = torch.nextafter(mids, torch.tensor(math.inf))
        x = torch.cat([torch.randn(4000) * levels[-1], mids, below, above, torch.tensor(levels),
                       torch.tensor([0.0, -0.0, 1e9, -1e9, math.inf, -math.inf, 1e-30, -1e-30])])  # fmt: skip
        assert torch.equal(_nearest_level(x, levels).long(), _nearest_by_comparison(x, levels)), dtype.name


@pytest.mark.parametrize("name", ["bitmod4", "bitmod3", "int4_asym", "int3_sym", "nf4", "ant3"])
def test_fake_quantisation_is_the_dequantized_choice(name: str) -> None:
    torch.manual_seed(1)
    W = torch.randn(24, 200) * torch.rand(200)
    for dtype in (torch.float32, torch.bfloat16):
        expected = choose_group_datatypes(W.to(dtype), name, 64, (1.0, 0.9)).dequantize(torch.float32).to(dtype)
        assert torch.equal(quantize_dequantize(W.to(dtype), name, 64, (1.0, 0.9)), expected)
