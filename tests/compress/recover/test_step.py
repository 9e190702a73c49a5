"""The recovery steps inside a recipe: prune with least squares + distill, written, reloaded in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from compress.pipeline import run
from compress.recipe import parse_recipe
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny("llama").save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def _recipe(model_dir, out, prune=None, distill=None):
    return {
        "model": str(model_dir),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": [
            {"prune": {"ratio": 0.3, "reconstruct": "least_squares", **(prune or {})}},
            {
                "distill": {
                    "samples": 4,
                    "seq_len": 32,
                    "batch_size": 2,
                    "steps": 3,
                    "global_steps": 2,
                    **(distill or {}),
                }
            },
        ],
        "output": {"dir": str(out)},
        "evaluation": None,
    }


def test_recovered_checkpoint_reloads_in_a_fresh_process_with_equal_logits(model_dir, tmp_path):
    result = run(_recipe(model_dir, tmp_path / "out"))
    prune, distill = result.report["steps"]
    assert len(prune["refit_residual"]) == 2 and prune["config"]["reconstruct"] == "least_squares"
    assert len(distill["block_loss"]) == 2 and len(distill["global_loss"]) == 2
    assert len(distill["data_sha256"]) == 64 and distill["config"]["data"] == "mix:calibration"
    recorded = json.loads((result.checkpoint / "secateurs.json").read_text())
    assert recorded["steps"][1]["block_loss"] == distill["block_loss"]
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(result.checkpoint)!r}, trust_remote_code=True,"
        " dtype=torch.float32)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float((torch.load(tmp_path / "logits.pt", weights_only=True) - expected).abs().max()) <= 1e-5


def test_ratio_zero_with_least_squares_changes_nothing(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(model_dir, tmp_path / "out", prune={"ratio": 0.0})
    recipe["steps"] = recipe["steps"][:1]
    result = run(recipe)
    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for (name, p), (_, q) in zip(result.model.state_dict().items(), dense.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_recipe_errors():
    base = {"steps": [{"prune": {"ratio": 0.2, "reconstruct": "least_squares", "statistics": "progressive"}}]}
    parse_recipe(base)  # valid as a recipe; the pruner refuses it
    with pytest.raises(InputError, match="contradicts"):
        parse_recipe({"steps": [{"prune": {"reconstruct": "none", "bias_compensation": True}}]})
    with pytest.raises(InputError, match="distill.train"):
        parse_recipe({"steps": [{"distill": {"train": "everything"}}]})
    assert parse_recipe({"steps": [{"prune": {"method": "wanda-sp"}}]}).steps[0].prune.reconstruct == "none"


def test_report_shows_every_perplexity_text(model_dir, tmp_path):
    recipe = _recipe(model_dir, tmp_path / "out")
    recipe["steps"] = recipe["steps"][:1]
    texts = [{"data": d, "seq_len": 32, "max_windows": 2} for d in ("web:eval", "prose:eval")]
    recipe["evaluation"] = {"perplexity": texts, "lm_eval": None}
    rows = {r["metric"]: r for r in run(recipe).report["evaluation"]["rows"]}
    assert set(rows) == {"heldout/perplexity", "heldout/perplexity@prose:eval"}
    assert all(abs(r["recovery"] - r["dense"] / r["compressed"]) < 1e-3 for r in rows.values())
