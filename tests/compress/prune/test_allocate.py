import pytest
import torch

from compress.prune.allocate import (
    ModuleUnits,
    allocate,
    allocate_global,
    mlp_widths,
    snap_width,
    top_units,
    uniform_count,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_top_units_breaks_ties_by_index():
    assert top_units(t(1, 3, 3, 0), 2).tolist() == [False, True, True, False]


def test_global_walks_sorted_units_until_budget_reached():
    # costs: attention unit 10, mlp unit 1. Sorted: a0(2.0) m1(1.5) m0(1.0) a1(0.5) m2(-1)
    attn = ModuleUnits(t(2.0, 0.5), 10)
    mlp = ModuleUnits(t(1.0, 1.5, -1.0), 1)
    # min_units=0: keep cost target 11.5 -> a0 (10), m1 (11), m0 (12 >= 11.5) stop
    masks = allocate_global([attn, mlp], keep_cost=11.5, min_units=0)
    assert masks[0].tolist() == [True, False]
    assert masks[1].tolist() == [True, True, False]


def test_global_guard_keeps_one_unit_per_module():
    attn = ModuleUnits(t(-5.0, -6.0), 10)
    mlp = ModuleUnits(t(1.0, 2.0, 3.0), 1)
    masks = allocate_global([attn, mlp], keep_cost=12, min_units=1)
    assert masks[0].tolist() == [True, False]  # guard: best attention unit survives
    assert masks[1].tolist() == [False, True, True]  # 10 (guard a0) + m2 (guard) + m1 = 12


def _smollm_like(n_layers: int = 4):
    """SmolLM2 geometry: hidden 576, 3 KV groups × g=3 heads × d_h=64, MLP 1536."""
    hidden, d_h, g, n_kv, ffn = 576, 64, 3, 3, 1536
    attn_cost = hidden * d_h * (2 * g + 2)
    g_ = torch.Generator().manual_seed(0)
    attn = [
        ModuleUnits(torch.randn(n_kv, generator=g_, dtype=torch.float64), attn_cost) for _ in range(n_layers)
    ]
    mlp = [
        ModuleUnits(torch.randn(ffn, generator=g_, dtype=torch.float64), 3 * hidden) for _ in range(n_layers)
    ]
    return attn, mlp


def test_gqa_group_cost_equals_parameters_of_a_group():
    # one KV group: q rows g·d_h, k rows d_h, v rows d_h (each × hidden) + o columns g·d_h (× hidden)
    hidden, d_h, g = 576, 64, 3
    params = hidden * (g * d_h) + hidden * d_h * 2 + (g * d_h) * hidden
    assert params == hidden * d_h * (2 * g + 2)
    # 3 groups = the whole attention block of SmolLM2 (q 576², k/v 576·192, o 576²)
    assert 3 * params == 576 * 576 * 2 + 2 * 576 * 192


@pytest.mark.parametrize("structure", ["AL-AM", "AL-MM", "UL-MM"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget_met_within_one_unit(structure, ratio):
    attn, mlp = _smollm_like()
    a_masks, m_masks = allocate(structure, attn, mlp, ratio)
    total = sum(m.cost * m.scores.numel() for m in attn + mlp)
    kept = sum(int(k.sum()) * m.cost for k, m in zip(a_masks + m_masks, attn + mlp, strict=True))
    slack = attn[0].cost if structure == "AL-AM" else 3 * 576 * len(mlp)
    assert (1 - ratio) * total - 1e-6 <= kept + (slack if structure == "UL-MM" else 0)
    assert kept <= (1 - ratio) * total + slack
    assert all(int(k.sum()) >= 1 for k in a_masks + m_masks)


@pytest.mark.parametrize(
    ("ratio", "nearest", "floor"), [(0.2, 2, 3), (0.3, 2, 3), (0.5, 2, 2), (0.7, 1, 1), (0.0, 3, 3)]
)
def test_uniform_count_floor_is_the_wanda_sp_reference(ratio, nearest, floor):
    # reference: thresh = sort(score)[int(ratio·n)]; keep score ≥ thresh → removes int(ratio·n) of n units
    assert uniform_count(3, ratio, "nearest") == nearest
    assert uniform_count(3, ratio, "floor") == floor
    assert uniform_count(1536, 0.3, "floor") == 1536 - int(0.3 * 1536)


def test_ul_mm_with_floor_keeps_all_groups_at_20_percent_and_spends_the_budget_on_the_mlp():
    attn, mlp = _smollm_like()
    a_masks, m_masks = allocate("UL-MM", attn, mlp, 0.2, rounding="floor")
    assert {int(k.sum()) for k in a_masks} == {3}
    total = sum(m.cost * m.scores.numel() for m in attn + mlp)
    kept = sum(int(k.sum()) * m.cost for k, m in zip(a_masks + m_masks, attn + mlp, strict=True))
    assert abs(kept - 0.8 * total) <= 3 * 576 * len(mlp)


def test_min_units_zero_removes_whole_modules_but_never_layer_0_attention():
    attn = [ModuleUnits(t(-9.0, -8.0), 10), ModuleUnits(t(-9.0, -8.0), 10)]
    mlp = [ModuleUnits(t(1.0, 2.0, 3.0), 1), ModuleUnits(t(1.0, 2.0, 3.0), 1)]
    a_masks, m_masks = allocate("AL-AM", attn, mlp, ratio=1 - 16 / 46, min_units=0)
    assert a_masks[0].tolist() == [False, True]  # the layer-0 guard keeps its best group
    assert a_masks[1].tolist() == [False, False]  # removed by the threshold
    assert [int(m.sum()) for m in m_masks] == [3, 3]
    a_masks, _ = allocate("AL-AM", attn, mlp, ratio=1 - 16 / 46, min_units=1)
    assert [int(a.sum()) for a in a_masks] == [1, 1]


def test_snap_width_nearest_allowed_width():
    assert mlp_widths(100, 32) == [32, 64, 96, 100]
    assert [snap_width(w, 100, 32) for w in (0, 47, 48, 49, 99, 500)] == [32, 32, 32, 64, 100, 100]


def test_uniform_structures_give_every_layer_the_same_width():
    attn, mlp = _smollm_like()
    a_masks, m_masks = allocate("UL-UM", attn, mlp, 0.2)
    assert {int(k.sum()) for k in a_masks} == {2}  # round(0.8 · 3)
    assert {int(k.sum()) for k in m_masks} == {round(0.8 * 1536)}
    a_masks, m_masks = allocate("UL-MM", attn, mlp, 0.2)
    assert len({int(k.sum()) for k in m_masks}) == 1


def test_ratio_zero_keeps_everything():
    attn, mlp = _smollm_like(2)
    for structure in ("AL-AM", "AL-MM", "UL-UM", "UL-MM"):
        a_masks, m_masks = allocate(structure, attn, mlp, 0.0)
        assert all(bool(k.all()) for k in a_masks + m_masks), structure
