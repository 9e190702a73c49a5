"""``secateurs search`` start-up: the study database is created only after the model and the whole space
validate (both ends of every range), and it lives under ``--out``."""

from __future__ import annotations

import os

import pytest
import yaml

pytest.importorskip("optuna")


def _recipe(model_dir, out, space):
    return {
        "model": str(model_dir),
        "calibration": {"samples": 4, "seq_len": 16, "batch_size": 4},
        "steps": [{"prune": {"ratio": 0.2}}],
        "output": {"dir": str(out)},
        "evaluation": None,
        "search": {
            "trials": 2,
            "space": space,
            "objectives": ["ppl", "params"],
            "perplexity": {"data": "web:eval", "seq_len": 32, "max_windows": 1},
        },
    }


def _run(tmp_path, recipe, *args):
    from search.cli import main

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return main([str(path), *args])
    finally:
        os.chdir(cwd)


def _databases(root):
    return sorted(p.name for p in root.rglob("*.db*"))


def test_invalid_upper_end_fails_at_start_up_and_creates_no_database(tiny4_dir, tmp_path, capsys):
    recipe = _recipe(tiny4_dir, tmp_path / "out", {"ratio": {"low": 0.1, "high": 1.0}})
    assert _run(tmp_path, recipe) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio" in err[0]
    assert _databases(tmp_path) == [] and not (tmp_path / "out").exists()


def test_rejected_model_creates_no_database(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # no weights
    recipe = _recipe(tmp_path / "m", tmp_path / "out", {"ratio": {"low": 0.1, "high": 0.5}})
    assert _run(tmp_path, recipe) == 2
    assert "has no weights" in capsys.readouterr().err
    assert _databases(tmp_path) == [] and not (tmp_path / "out").exists()


def test_study_database_lives_under_out(tiny4_dir, tmp_path):
    recipe = _recipe(tiny4_dir, tmp_path / "recipe-out", {"ratio": {"low": 0.1, "high": 0.5}})
    assert _run(tmp_path, recipe, "--out", str(tmp_path / "cli-out"), "--trials", "0") == 0
    assert (tmp_path / "cli-out" / "search.db").exists()
    assert not (tmp_path / "recipe-out").exists()
