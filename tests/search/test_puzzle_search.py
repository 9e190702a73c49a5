"""Puzzle in the search driver on a real (tiny) model: trials that pick budgets (parameter ratio, KV-cache ratio)
with the integer program picking the architecture, and Puzzle-MIP widths as seeds of a width search."""

import copy
import json

import pytest
import yaml

from compress.adapters import arch_for
from compress.corpus import calibration_batches
from compress.loading import load_model
from compress.prune.pruner import collect_statistics, count_parameters, prunable_parameters
from compress.puzzle.config import PuzzleConfig
from compress.puzzle.step import run_puzzle
from search.cli import main as search_cli

pytest.importorskip("compress.session")

CALIBRATION = {"data": "web:calibration", "samples": 8, "seq_len": 32, "batch_size": 4}


def _puzzle(tmp_path) -> dict:
    return {"mlp_steps": 4, "samples": 4, "seq_len": 16, "cache_dir": str(tmp_path / "library")}


def _run(tmp_path, recipe: dict) -> list[dict]:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert search_cli([str(path)]) == 0
    return json.loads((tmp_path / "out" / "trials.json").read_text())


def test_trials_pick_budgets_and_the_milp_picks_the_architecture(tiny4_dir, tmp_path):
    recipe = {
        "model": str(tiny4_dir),
        "calibration": CALIBRATION,
        "steps": [{"prune": {"structure": "puzzle", "ratio": 0.3, "puzzle": _puzzle(tmp_path)}}],
        "output": {"dir": str(tmp_path / "out")},
        "evaluation": {"perplexity": {"seq_len": 64, "max_windows": 2}, "lm_eval": None},
        "search": {
            "trials": 3,
            "sampler": {"name": "random"},
            "space": {"ratio": {"low": 0.2, "high": 0.7}, "kv_cache_ratio": {"low": 0.4, "high": 1.0}},
            "objectives": ["ppl", "params"],
            "seeds": [{"kind": "params", "params": {"ratio": 0.7, "kv_cache_ratio": 0.4}}],
            "perplexity": {"data": "web:eval", "seq_len": 64, "max_windows": 2},
        },
    }
    trials = _run(tmp_path, recipe)
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    loaded = load_model(str(tiny4_dir))
    dense, arch = loaded.model, arch_for(loaded.model.config)
    total, prunable = count_parameters(dense), prunable_parameters(dense, arch)
    ids = calibration_batches(loaded.tokenizer, "web:calibration", 8, 32, 0)
    stats = collect_statistics(dense, arch, ids, 4)
    for trial in trials:
        ratio, kv = trial["params"]["ratio"], trial["params"]["kv_cache_ratio"]
        assert trial["metrics"]["params"] <= total - ratio * prunable  # the parameter budget holds
        # the same budgets through the prune step directly: the same architecture and parameter count
        cfg = PuzzleConfig(**_puzzle(tmp_path), kv_cache_ratio=kv)
        record = run_puzzle(copy.deepcopy(dense), arch, ratio, cfg, ids, 4, stats)
        assert record["parameters"] == trial["metrics"]["params"]
        assert record["milp"]["costs"]["kv_bytes"] <= kv * 2 * 4 * 3 * 8 * 2 + 1e-6  # 4 layers × 3 KV heads × d_h 8
    assert len({t["metrics"]["params"] for t in trials}) == 3


def test_puzzle_widths_seed_a_width_search(tiny4_dir, tmp_path):
    """A ``kind: puzzle`` seed enqueues exactly the Puzzle-MIP choice's widths (no-ops as skips)."""
    recipe = {
        "model": str(tiny4_dir),
        "calibration": CALIBRATION,
        "steps": [{"prune": {"ratio": 0.5, "mlp_step": 24}}],
        "output": {"dir": str(tmp_path / "out")},
        "evaluation": {"perplexity": {"seq_len": 64, "max_windows": 2}, "lm_eval": None},
        "search": {
            "trials": 1,
            "sampler": {"name": "random"},
            "space": {"keep": {"block": 1, "attn": {"low": 0.3, "high": 1.0}, "skip_from": 1}},
            "objectives": ["ppl", "params"],
            "seeds": [{"kind": "puzzle", "ratio": 0.5, "puzzle": _puzzle(tmp_path)}],
            "perplexity": {"data": "web:eval", "seq_len": 64, "max_windows": 2},
        },
    }
    (trial,) = _run(tmp_path, recipe)
    assert trial["seed"] == "puzzle ratio=0.5"
    loaded = load_model(str(tiny4_dir))
    dense, arch = loaded.model, arch_for(loaded.model.config)
    ids = calibration_batches(loaded.tokenizer, "web:calibration", 8, 32, 0)
    record = run_puzzle(
        dense, arch, 0.5, PuzzleConfig(**_puzzle(tmp_path)), ids, 4, collect_statistics(dense, arch, ids, 4)
    )
    assert any(record["skipped"]) or min(record["intermediate_sizes"]) < 96  # a non-trivial choice
    params = trial["params"]
    for i, (groups, channels) in enumerate(zip(record["kv_groups"], record["intermediate_sizes"], strict=True)):
        assert (params.get(f"attn_skip.L{i}", False), params.get(f"mlp_skip.L{i}", False)) == (
            groups == 0,
            channels == 0,
        )
        if groups:
            assert params[f"attn_groups.L{i}"] == groups
        if channels:
            assert params[f"mlp_channels.L{i}"] == channels
    assert trial["metrics"]["params"] == record["parameters"]  # FLAP's surgery at these widths = Puzzle's costs
