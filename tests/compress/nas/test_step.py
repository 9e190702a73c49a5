"""The ``nas`` recipe step end to end on a tiny model: search, prune, write; the checkpoint (mixed widths and
removed sub-blocks) reloads with equal logits; same recipe + seed → same weights."""

import json

import pytest

from compress.pipeline import run
from compress.recipe import parse_recipe
from quant.errors import InputError


@pytest.fixture(scope="module")
def model_dir(tiny4_dir):
    return tiny4_dir


def _recipe(model_dir, out, **nas):
    return {
        "model": str(model_dir),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": [
            {
                "nas": {
                    "params_ratio": 0.6,
                    "tolerance": 0.05,
                    "proxy_samples": 2,
                    "proxy_seq_len": 24,
                    "population": 6,
                    "generations": 3,
                    "elites": 2,
                    "mlp_step": 16,
                    "skip_from": 2,
                    **nas,
                }
            }
        ],
        "output": {"dir": str(out)},
        "evaluation": {"perplexity": {"seq_len": 64, "max_windows": 2}, "lm_eval": None},
    }


def test_nas_step_writes_a_reloadable_checkpoint(model_dir, tmp_path):
    result = run(_recipe(model_dir, tmp_path / "a"))
    report = result.report
    assert report["reload_max_abs_logit_diff"] <= 1e-5
    (step,) = report["steps"]
    assert step["summary"].startswith("nas phi params_ratio=0.6")
    assert step["candidates_scored"] >= 6 and len(step["history"]) == 3
    assert step["history"] == sorted(step["history"])
    fraction = report["sizes"]["prunable_after"] / report["sizes"]["prunable_before"]
    assert 0.55 <= fraction <= 0.65
    assert step["best"]["params"] == report["sizes"]["prunable_after"]
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["secateurs_skipped"] == step["skipped"]
    # the equivalent prune step reproduces the same structure
    again = run({**_recipe(model_dir, tmp_path / "b"), "steps": [{"prune": step["equivalent_prune_step"]}]})
    assert again.report["sizes"] == report["sizes"]


def test_same_seed_same_checkpoint(model_dir, tmp_path):
    a = run(_recipe(model_dir, tmp_path / "a", generations=2))
    b = run(_recipe(model_dir, tmp_path / "b", generations=2))
    assert (a.checkpoint / "model.safetensors").read_bytes() == (b.checkpoint / "model.safetensors").read_bytes()


def test_nas_config_errors_name_the_field():
    with pytest.raises(InputError, match="steps.0.nas.params_ratio"):
        parse_recipe({"steps": [{"nas": {"params_ratio": 1.5}}]})
    with pytest.raises(InputError, match="unknown key 'steps.0.nas.generation'"):
        parse_recipe({"steps": [{"nas": {"generation": 3}}]})
