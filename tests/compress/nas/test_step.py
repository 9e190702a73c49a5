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


def test_least_squares_candidates_are_the_prune_steps_refit(model_dir, tmp_path):
    """``least_squares: true`` refits every candidate (the candidates engine runs the prune step's least squares)
    and the chosen model; the equivalent prune step reproduces the checkpoint bit for bit."""
    import copy

    import torch

    from compress.adapters import arch_for
    from compress.candidates import DenseCache
    from compress.prune.pruner import prune_model
    from tests.conftest import build_tiny

    dense = build_tiny("llama", num_hidden_layers=3)
    arch = arch_for(dense.config)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    engine = DenseCache(dense, arch, ids, 4).nas(mlp_step=16, skip_from=2, least_squares=True)
    cand = engine.uniform_candidate(0.6, 0.05)
    cfg = engine.prune_config(cand)
    assert cfg.reconstruct == "least_squares"
    reference = copy.deepcopy(dense)
    prune_model(reference, arch, cfg, ids, 4)
    realized = engine.realize(cand).model
    for (name, p), (_, q) in zip(realized.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    plain = DenseCache(dense, arch, ids, 4).nas(mlp_step=16, skip_from=2).realize(cand).model
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), realized.parameters(), strict=True))

    result = run(_recipe(model_dir, tmp_path / "a", generations=1, least_squares=True))
    (step,) = result.report["steps"]
    assert step["equivalent_prune_step"]["reconstruct"] == "least_squares"
    again = run({**_recipe(model_dir, tmp_path / "b"), "steps": [{"prune": step["equivalent_prune_step"]}]})
    a, b = (r.checkpoint / "model.safetensors" for r in (result, again))
    assert a.read_bytes() == b.read_bytes()
