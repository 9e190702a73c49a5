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


def test_puzzle_with_least_squares_and_distill_runs_and_reloads(tiny4_dir, tmp_path):
    """``structure: puzzle`` + ``reconstruct: least_squares`` + a ``distill`` step through the pipeline: the refit
    is recorded per layer, the distillation trains the chosen architecture, the checkpoint reloads."""
    puzzle = {"samples": 4, "seq_len": 16, "mlp_steps": 4, "cache_dir": str(tmp_path / "cache")}
    recipe = {
        "model": str(tiny4_dir),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": [
            {"prune": {"ratio": 0.5, "structure": "puzzle", "reconstruct": "least_squares", "puzzle": puzzle}},
            {"distill": {"samples": 8, "seq_len": 32, "batch_size": 4, "steps": 4, "lr": 1e-4, "global_steps": 0}},
        ],
        "output": {"dir": str(tmp_path / "out")},
        "evaluation": None,
    }
    report = run(recipe).report
    assert report["reload_max_abs_logit_diff"] <= 1e-5
    prune, distill = report["steps"]
    assert len(prune["refit_residual"]) == 4 and prune["equivalent_prune_step"]["reconstruct"] == "least_squares"
    assert prune["parameters"] == report["sizes"]["params_after"]
    assert len(distill["block_loss"]) == 4
    assert all(b["loss_after"] < b["loss_before"] for b in distill["block_loss"]), distill["block_loss"]


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
