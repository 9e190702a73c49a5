"""search/space.py and search/seeds.py: distributions, the overlay onto a recipe, seed points."""

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from compress.recipe import parse_recipe
from quant.errors import InputError
from search.seeds import SeedConfig, check_point, seed_params
from search.space import (
    ModelShape,
    SpaceConfig,
    bit_overrides,
    distributions,
    keep_counts,
    layer_blocks,
    overlay,
    summarize,
)

SHAPE = ModelShape(num_layers=6, n_kv=3, intermediate_size=96, mlp_step=32)
BASE = parse_recipe({
    "model": "m",
    "steps": [
        {"prune": {"method": "flap", "ratio": 0.2}},
        {
            "quantize": {
                "dtypes": "bitmod4",
                "group_size": 32,
                "overrides": [{"match": "down_proj", "dtypes": "int8_asym"}],
            }
        },
    ],
})


def test_layer_blocks_cover_every_layer_once():
    blocks = layer_blocks(7, 3)
    assert [list(b) for b in blocks] == [[0, 1, 2], [3, 4, 5], [6]]


def test_global_space_distributions():
    space = SpaceConfig.model_validate(
        {"ratio": {"low": 0.1, "high": 0.5, "step": 0.1}, "structure": ["AL-AM", "UL-UM"]}
    )
    dists = distributions(space, SHAPE)
    assert dists == {
        "ratio": FloatDistribution(0.1, 0.5, step=0.1),
        "structure": CategoricalDistribution(["AL-AM", "UL-UM"]),
    }


def test_keep_space_integer_widths_and_skips_only_from_skip_from():
    space = SpaceConfig.model_validate(
        {"keep": {"block": 2, "attn": {"low": 0.3, "high": 1.0}, "mlp": {"low": 0.25, "high": 1.0}, "skip_from": 2}}
    )
    dists = distributions(space, SHAPE)
    assert dists["attn_groups.L0-1"] == IntDistribution(1, 3)  # ceil(0.3·3) = 1 .. 3 groups
    assert dists["mlp_channels.L4-5"] == IntDistribution(32, 96, step=32)  # multiples of mlp_step ≥ 0.25·96
    skips = sorted(name for name in dists if "_skip" in name)
    assert skips == ["attn_skip.L2-3", "attn_skip.L4-5", "mlp_skip.L2-3", "mlp_skip.L4-5"]  # never layer 0


def test_keep_space_errors_name_the_field():
    with pytest.raises(InputError, match="keep.attn"):
        distributions(SpaceConfig.model_validate({"keep": {"attn": {"low": 0.5, "high": 0.6}}}), SHAPE)
    with pytest.raises(InputError, match="skip_from: 6 but the model has 6 layers"):
        distributions(SpaceConfig.model_validate({"keep": {"skip_from": 6}}), SHAPE)
    with pytest.raises(ValueError, match="drop ratio/structure"):
        SpaceConfig.model_validate({"keep": {}, "ratio": {"low": 0.1, "high": 0.2}})
    with pytest.raises(ValueError, match="skip_from"):
        SpaceConfig.model_validate({"keep": {"skip_from": 0}})  # layer 0 is never skipped


def test_overlay_writes_global_ratio_and_structure_without_touching_base():
    space = SpaceConfig.model_validate({"ratio": {"low": 0.1, "high": 0.5}, "structure": ["UL-UM"], "group_size": [64]})
    recipe = overlay(BASE, {"ratio": 0.35, "structure": "UL-UM", "group_size": 64}, space, SHAPE)
    prune = recipe.steps[0].prune
    assert (prune.method, prune.ratio, prune.structure) == ("flap", 0.35, "UL-UM")
    assert recipe.steps[1].quantize.group_size == 64
    assert BASE.steps[0].prune.ratio == 0.2 and BASE.steps[0].prune.structure == "AL-AM"  # pure


def test_overlay_per_block_widths_skips_and_bits():
    space = SpaceConfig.model_validate(
        {
            "keep": {"block": 3, "skip_from": 3},
            "bits": {
                "block": 2,
                "choices": [3, 4, 8],
                "datatypes": {3: ["bitmod3"], 4: ["bitmod4", "nf4"], 8: ["int8_asym"]},
            },
        }
    )
    params = {
        "attn_groups.L0-2": 3,
        "mlp_channels.L0-2": 64,
        "attn_groups.L3-5": 2,
        "mlp_channels.L3-5": 32,
        "attn_skip.L3-5": True,
        "mlp_skip.L3-5": False,
        "bits.L0-1": 8,
        "bits.L2-3": 4,
        "bits.L4-5": 3,
        "dtypes.4bit": "nf4",
    }
    check_point(params, distributions(space, SHAPE), "test")
    recipe = overlay(BASE, params, space, SHAPE)  # a validated Recipe
    prune = recipe.steps[0].prune
    assert prune.attn_groups == [3, 3, 3, 0, 0, 0]  # integer counts: no fraction round trip
    assert prune.mlp_channels == [64] * 3 + [32] * 3
    overrides = [o.model_dump(include={"match", "dtypes"}) for o in recipe.steps[1].quantize.overrides]
    assert overrides == [
        {"match": r"^model\.layers\.(0|1)\.", "dtypes": "int8_asym"},
        {"match": r"^model\.layers\.(2|3)\.", "dtypes": "nf4"},
        {"match": r"^model\.layers\.(4|5)\.", "dtypes": "bitmod3"},
        {"match": "down_proj", "dtypes": "int8_asym"},  # the base recipe's own override comes after
    ]
    assert summarize(params, SHAPE) == "attn 0.50 mlp 0.50 skip 3 3b×2 4b×2 8b×2 4bit=nf4"


def test_keep_counts_absent_without_width_params():
    assert keep_counts({"ratio": 0.2}, SHAPE) is None
    assert bit_overrides({}, SHAPE, SpaceConfig.model_validate({"bits": {}}).bits) == []


def test_bits_datatypes_must_have_the_right_width():
    with pytest.raises(ValueError, match="'bitmod4' has 4 bits, not 3"):
        SpaceConfig.model_validate({"bits": {"datatypes": {3: ["bitmod4"], 4: ["bitmod4"], 8: ["int8_asym"]}}})
    with pytest.raises(ValueError, match="no datatype set for \\[8\\] bits"):
        SpaceConfig.model_validate({"bits": {"choices": [4, 8], "datatypes": {4: ["bitmod4"]}}})


def test_uniform_and_flap_adaptive_seeds_in_a_keep_space():
    space = SpaceConfig.model_validate({"keep": {"skip_from": 2}, "bits": {"choices": [4, 8]}})
    shape = ModelShape(num_layers=4, n_kv=3, intermediate_size=96)
    dists = distributions(space, shape)
    uniform = seed_params(SeedConfig(kind="uniform", ratio=1 / 3), space, shape, dists, BASE)
    assert uniform is not None
    assert [uniform[f"attn_groups.L{i}"] for i in range(4)] == [2] * 4
    assert [uniform[f"mlp_channels.L{i}"] for i in range(4)] == [64] * 4
    assert not any(v for k, v in uniform.items() if "_skip" in k)
    assert {uniform[f"bits.L{i}"] for i in range(4)} == {4}

    def allocation(ratio):
        return [3, 2, 1, 0], [96, 64, 40, 32]

    adaptive = seed_params(SeedConfig(kind="flap-adaptive", bits=8), space, shape, dists, BASE, allocation)
    assert adaptive is not None
    assert [adaptive[f"attn_groups.L{i}"] for i in range(4)] == [3, 2, 1, 1]  # 0 groups → skip flag, range min
    assert adaptive["attn_skip.L3"] is True and adaptive["attn_skip.L2"] is False
    assert [adaptive[f"mlp_channels.L{i}"] for i in range(4)] == [96, 64, 32, 32]  # snapped to mlp_step
    check_point(adaptive, dists, "seed")
    assert seed_params(SeedConfig(kind="flap-adaptive"), space, shape, dists, BASE, None) is None


def test_seeds_in_a_global_space_and_explicit_points():
    space = SpaceConfig.model_validate(
        {"ratio": {"low": 0.1, "high": 0.5, "step": 0.1}, "structure": ["AL-AM", "UL-UM"]}
    )
    dists = distributions(space, SHAPE)
    assert seed_params(SeedConfig(kind="uniform", ratio=0.33), space, SHAPE, dists, BASE) == {
        "ratio": pytest.approx(0.3),
        "structure": "UL-UM",
    }
    assert seed_params(SeedConfig(kind="flap-adaptive"), space, SHAPE, dists, BASE) == {
        "ratio": pytest.approx(0.2),  # the base recipe's ratio
        "structure": "AL-AM",
    }
    with pytest.raises(InputError, match="unknown parameter 'ratios'"):
        check_point({"ratios": 0.2}, dists, "search.seeds.0")
    with pytest.raises(InputError, match="ratio=0.9 lies outside"):
        check_point({"ratio": 0.9}, dists, "search.seeds.0")
    with pytest.raises(ValueError, match="params is given exactly when kind is 'params'"):
        SeedConfig(kind="params")
