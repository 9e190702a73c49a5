"""``prune: {structure: puzzle}`` through the recipe pipeline, and its recipe validation."""

from __future__ import annotations

import json

import pytest

from compress.pipeline import run
from compress.recipe import parse_recipe
from quant.errors import InputError


def test_puzzle_prune_step_runs_writes_and_reloads(tiny4_dir, tmp_path):
    recipe = {
        "model": str(tiny4_dir),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": [
            {
                "prune": {
                    "ratio": 0.5,
                    "structure": "puzzle",
                    "puzzle": {"samples": 4, "seq_len": 16, "mlp_steps": 4, "cache_dir": str(tmp_path / "cache")},
                }
            }
        ],
        "output": {"dir": str(tmp_path / "out")},
        "evaluation": None,
    }
    result = run(recipe)
    report = result.report
    assert report["reload_max_abs_logit_diff"] <= 1e-5
    (step,) = report["steps"]
    assert step["summary"] == "flap puzzle ratio=0.5"
    assert step["parameters"] == report["sizes"]["params_after"]
    assert report["sizes"]["removed_prunable_fraction"] >= 0.5
    stored = json.loads((result.checkpoint / "secateurs.json").read_text())
    assert stored["recipe"]["steps"][0]["prune"]["puzzle"]["mlp_steps"] == 4


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"puzzle": {"samples": 2}}, "only used with structure: puzzle"),
        ({"structure": "puzzle", "method": "wanda-sp"}, "needs method flap"),
        ({"structure": "puzzle", "puzzle": {"estimate": "fast"}}, "estimate"),
    ],
)
def test_puzzle_recipe_errors_name_the_problem(prune, message):
    with pytest.raises(InputError, match=message):
        parse_recipe({"steps": [{"prune": prune}]})
