import pytest
import yaml

from compress.recipe import apply_overrides, load_recipe, parse_recipe
from quant.errors import InputError


def test_defaults_depend_on_method():
    flap = parse_recipe({"steps": [{"prune": {"method": "flap"}}]}).steps[0].prune
    wanda = parse_recipe({"steps": [{"prune": {"method": "wanda-sp"}}]}).steps[0].prune
    assert (flap.structure, flap.bias_compensation) == ("AL-AM", True)
    assert (wanda.structure, wanda.bias_compensation) == ("UL-MM", False)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": []}, "unknown key 'stepz'"),
        ({"steps": [{"prune": {"ratoi": 0.2}}]}, "unknown key 'steps.0.prune.ratoi'"),
        ({"steps": [{"prune": {"ratio": 1.0}}]}, "field 'steps.0.prune.ratio'"),
        ({"steps": [{"prune": {"ratio": -0.1}}]}, "field 'steps.0.prune.ratio'"),
        ({"steps": [{"prune": {"ratio": "lots"}}]}, "field 'steps.0.prune.ratio'"),
        ({"steps": [{"prune": {"metric": "XYZ"}}]}, "field 'steps.0.prune.metric'"),
        ({"steps": [{"prune": {"structure": "AL-XX"}}]}, "field 'steps.0.prune.structure'"),
        ({"calibration": {"samples": 0}}, "field 'calibration.samples'"),
        (  # Puzzle fits linear replacements on windows after the scoring ones: 4 + 32 > 16
            {
                "calibration": {"samples": 16},
                "steps": [{"prune": {"structure": "puzzle", "puzzle": {"allow_linear": True}}}],
            },
            "steps.0.prune.puzzle.fit_samples: needs at least 36 calibration windows",
        ),
        (
            {"steps": [{"prune": {"structure": "puzzle", "puzzle": {"repair": "least_squares"}}}]},
            "puzzle.repair: least_squares scores the variants as reconstruct: least_squares realises them",
        ),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_recipes_name_the_field(data, message):
    with pytest.raises(InputError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_recipe(data)


def test_overrides_parse_yaml_values_and_index_lists():
    data = apply_overrides({"steps": [{"prune": {"ratio": 0.2}}]}, ["steps.0.prune.ratio=0.5", "seed=3"])
    assert data == {"steps": [{"prune": {"ratio": 0.5}}], "seed": 3}
    with pytest.raises(InputError, match="no such place"):
        apply_overrides({"steps": []}, ["steps.4.prune.ratio=0.5"])
    with pytest.raises(InputError, match="key.path=value"):
        apply_overrides({}, ["ratio"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(bad)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert path.read_text().startswith("#"), f"{path.name} needs a header comment"
        if "search" in yaml.safe_load(path.read_text()):
            continue  # search recipes (secateurs search): validated by tests/search/test_config.py
        load_recipe(path)
