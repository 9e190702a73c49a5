"""search/report.py, search/materialize.py and search/cli.py: Pareto front, exports, checkpoints, exit codes."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from compress.cli import main as secateurs
from search.cli import main as search_cli
from search.report import dominates, pareto_indices
from tests.search.synthetic import SyntheticSession, synthetic_recipe


def test_pareto_front_by_hand():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (4.0, 1.0), (2.0, 3.0), (5.0, 5.0)]
    assert pareto_indices(points, ["minimize", "minimize"]) == [0, 1, 3, 4]
    assert pareto_indices(points, ["maximize", "maximize"]) == [5]
    assert pareto_indices(points, ["minimize", "maximize"]) == [0]
    assert dominates((1, 1), (1, 2), ["minimize", "minimize"]) and not dominates((1, 2), (1, 2), ["minimize"] * 2)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One finished study on disk (12 trials, a parameter constraint), searched through the CLI."""
    folder = tmp_path_factory.mktemp("search")
    data = synthetic_recipe(
        str(folder / "out"),
        trials=12,
        constraints=[{"metric": "params", "max": 14000}],
        seeds=[{"kind": "uniform", "ratio": 0.1}, {"kind": "flap-adaptive", "ratio": 0.3}],
    )
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    assert search_cli([str(path)], session_factory=lambda _: SyntheticSession()) == 0
    return path, folder / "out"


def test_report_files(searched):
    _, out = searched
    records = json.loads((out / "trials.json").read_text())
    assert len(records) == 12 and records[0]["seed"] == "uniform ratio=0.1"
    assert records[0]["state"] == "PRUNED" and "params" in records[0]["pruned"]  # 15,800 > 14,000 parameters
    complete = [r for r in records if r["state"] == "COMPLETE"]
    assert complete and all(set(r["values"]) == {"ppl", "params"} for r in complete)
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 12 and {"number", "state", "value.ppl", "param.ratio", "metric.params"} <= set(rows[0])
    table = (out / "pareto.md").read_text()
    assert "| trial | ppl ↓ | params ↓ | candidate |" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = [int(line.split("|")[1]) for line in table.splitlines() if line.startswith("| ") and "trial" not in line]
    assert front and len({records[n]["values"]["params"] for n in front}) == len(front)  # no re-measured point
    for number in front:
        assert records[number]["state"] == "COMPLETE" and records[number]["feasible"]
        assert records[number]["values"]["params"] <= 14000


def test_report_only_and_materialize_through_the_normal_runner(searched, tmp_path):
    path, out = searched
    recipes = []

    def runner(recipe):
        recipes.append(recipe)
        report = {"sizes": {"params_after": 123}, "evaluation": {"rows": [{"metric": "ppl", "compressed": 12.5}]}}
        return SimpleNamespace(checkpoint=Path(recipe.output.dir), report=report)

    storage = f"sqlite:///{out / 'search.db'}"  # --out moves the default study database too: name the stored one
    code = search_cli(
        [str(path), "--report-only", "--materialize", "2", "--out", str(tmp_path), "--storage", storage], runner=runner
    )
    assert code == 0
    assert (tmp_path / "pareto.md").read_text() == (out / "pareto.md").read_text()
    materialized = json.loads((tmp_path / "materialized.json").read_text())
    assert len(materialized) == len(recipes) == 2
    for record, recipe in zip(materialized, recipes, strict=True):
        assert recipe.output.dir == str(tmp_path / "pareto" / f"trial-{record['trial']}")
        assert recipe.steps[0].prune.ratio > 0
    assert "| trial | search ppl | search params |" in (tmp_path / "materialized.md").read_text()


def test_cli_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(synthetic_recipe(str(tmp_path), trails=3)))
    assert secateurs(["search", str(bad)]) == 2
    assert "unknown key 'search.trails'" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(synthetic_recipe(str(tmp_path / "none"))))
    assert secateurs(["search", str(good), "--report-only"]) == 2
    assert "no study 'good'" in capsys.readouterr().err
    assert secateurs(["search", str(good), "--report-only", "--storage", "nosuchdb://x"]) == 2
    assert "--storage 'nosuchdb://x'" in capsys.readouterr().err
