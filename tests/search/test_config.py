"""search/config.py and search/samplers.py: the search: block, its errors, the shipped search recipes."""

from pathlib import Path

import optuna
import pytest
import yaml

from quant.errors import InputError
from search.config import SamplerConfig, load_search_recipe, parse_search_recipe
from search.samplers import build_sampler
from search.seeds import check_point, seed_params
from search.space import ModelShape, distributions, overlay
from tests.search.synthetic import synthetic_recipe

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("smollm2-search-*.yaml"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trails": 5}, "unknown key 'search.trails'"),
        ({"trials": 0}, "field 'search.trials'"),
        ({"sampler": {"name": "cmaes"}}, "field 'search.sampler.name'"),
        ({"objectives": []}, "field 'search.objectives'"),
        ({"objectives": ["ppl", "ppl"]}, "repeated metric"),
        ({"objectives": ["perplexity"]}, "unknown metric 'perplexity'"),
        ({"constraints": [{"metric": "params"}]}, "search.constraints.0"),
        ({"space": {"keep": {"skip_from": 0}}}, "search.space.keep.skip_from"),
        ({"seeds": [{"kind": "best"}]}, "search.seeds.0.kind"),
    ],
)
def test_bad_search_blocks_name_the_field(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        parse_search_recipe(synthetic_recipe(str(tmp_path), **change))


def test_base_recipe_is_validated_and_must_have_the_overlaid_steps(tmp_path):
    data = synthetic_recipe(str(tmp_path))
    data["calibration"] = {"sample": 3}
    with pytest.raises(InputError, match="unknown key 'calibration.sample'"):
        parse_search_recipe(data)
    data = synthetic_recipe(str(tmp_path), space={"bits": {}})
    data["steps"] = [{"prune": {}}]
    with pytest.raises(InputError, match="no quantize step to overlay"):
        parse_search_recipe(data)
    with pytest.raises(InputError, match="no 'search:' block"):
        parse_search_recipe({"model": "x"})


def test_defaults_storage_and_fingerprint(tmp_path):
    recipe = parse_search_recipe(synthetic_recipe(str(tmp_path / "out")), name="mine")
    assert recipe.study_name == "mine"
    assert recipe.storage_url == f"sqlite:///{tmp_path / 'out' / 'search.db'}"
    moved = parse_search_recipe(synthetic_recipe(str(tmp_path / "elsewhere"), trials=99), name="mine")
    assert moved.fingerprint() == recipe.fingerprint()  # where it writes and how long it runs do not matter
    other = parse_search_recipe(synthetic_recipe(str(tmp_path), objectives=["ppl", "bytes"]), name="mine")
    assert other.fingerprint() != recipe.fingerprint()


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("nsga3", optuna.samplers.NSGAIIISampler),
        ("tpe", optuna.samplers.TPESampler),
        ("gp", optuna.samplers.GPSampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_sampler_selection(name, cls):
    sampler = build_sampler(SamplerConfig(name=name, population=8), seed=3)
    assert type(sampler) is cls
    if name == "tpe":
        assert sampler._multivariate
    if name.startswith("nsga"):
        assert sampler._population_size == 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_search_recipes_validate_and_their_seeds_overlay(path):
    assert path.read_text().startswith("#"), f"{path.name} needs a header comment"
    recipe = load_search_recipe(path)
    data = yaml.safe_load(path.read_text())
    assert data["model"] == "default"
    shape = ModelShape(num_layers=30, n_kv=3, intermediate_size=1536)  # SmolLM2-135M
    dists = distributions(recipe.search.space, shape)

    def allocation(ratio):
        return [2] * 30, [1024] * 30

    for index, seed in enumerate(recipe.search.seeds):
        params = seed_params(seed, recipe.search.space, shape, dists, recipe.base, allocation)
        assert params is not None and set(params) == set(dists)
        check_point(params, dists, f"seed {index}")
        overlay(recipe.base, params, recipe.search.space, shape)  # a valid recipe
