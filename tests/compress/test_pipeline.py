"""The whole recipe pipeline on a tiny model folder: prune + quantize, evaluate, write, reload, report."""

import json

import pytest

from compress.pipeline import run
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny("llama").save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def _recipe(model_dir, out, **extra):
    recipe = {
        "model": str(model_dir),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": [{"prune": {"ratio": 0.3}}, {"quantize": {"dtypes": "int4_asym", "group_size": 16}}],
        "output": {"dir": str(out)},
        "evaluation": {"perplexity": {"seq_len": 64, "max_windows": 2}, "lm_eval": None},
    }
    recipe.update(extra)
    return recipe


def test_prune_quantize_evaluate_write(model_dir, tmp_path):
    result = run(_recipe(model_dir, tmp_path / "out"))
    report = result.report
    assert report["reload_max_abs_logit_diff"] <= 1e-5
    assert report["sizes"]["params_after"] < report["sizes"]["params_before"]
    assert [s["summary"].split()[0] for s in report["steps"]] == ["flap", "quantize"]
    (row,) = report["evaluation"]["rows"]
    assert row["metric"] == "heldout/perplexity" and row["recovery"] > 0
    written = json.loads((result.checkpoint / "report.json").read_text())
    assert written["evaluation"] == report["evaluation"]
    assert json.loads((result.checkpoint / "secateurs.json").read_text())["recipe"]["steps"][0]["prune"]["ratio"] == 0.3


def test_same_recipe_and_seed_give_the_same_checkpoint(model_dir, tmp_path):
    outs = [run(_recipe(model_dir, tmp_path / name, evaluation=None)).checkpoint for name in ("a", "b")]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    assert (outs[0] / "config.json").read_text() == (outs[1] / "config.json").read_text()


def test_existing_output_is_refused_before_any_work(model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        run(_recipe(model_dir, tmp_path / "out"))
