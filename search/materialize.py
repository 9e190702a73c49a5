"""Chosen trials as real checkpoints: the trial's overlaid recipe through the normal pipeline (``secateurs run``).

Each checkpoint goes to ``<output.dir>/pareto/trial-<n>`` with the base recipe's full evaluation (held-out
perplexity and lm-eval tasks, against the dense model); ``materialized.json`` / ``.md`` collect the results.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.study import Study
from optuna.trial import FrozenTrial

from compress.recipe import Recipe
from quant.errors import InputError
from search.config import SearchRecipe
from search.report import pareto_trials
from search.space import ModelShape, overlay

log = logging.getLogger("secateurs")

Runner = Callable[[Recipe], Any]  # recipe → RunResult (compress.pipeline.run)


def spread(front: list[FrozenTrial], k: int) -> list[FrozenTrial]:
    """``k`` trials spread evenly along the front (sorted by the first objective), both ends included."""
    if k >= len(front):
        return list(front)
    if k == 1:
        return [front[0]]
    picks = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)})
    return [front[i] for i in picks]


def trial_recipe(recipe: SearchRecipe, trial: FrozenTrial, shape: ModelShape, out_dir: Path) -> Recipe:
    """The full recipe of ``trial``, writing to ``out_dir`` (never pushed to the Hub from a search)."""
    data = overlay(recipe.base, trial.params, recipe.search.space, shape, f"trial {trial.number}")
    output = data.output.model_copy(update={"dir": str(out_dir), "overwrite": True, "push_to_hub": None})
    return data.model_copy(update={"output": output})


def choose(study: Study, count: int | None = None, numbers: list[int] | None = None) -> list[FrozenTrial]:
    if numbers:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        missing = [n for n in numbers if n not in by_number or by_number[n].values is None]
        if missing:
            raise InputError(f"--materialize-trials: no complete trial {missing} in study {study.study_name!r}")
        return [by_number[n] for n in numbers]
    return spread(pareto_trials(study), count or 0)


def materialize(
    study: Study,
    recipe: SearchRecipe,
    trials: list[FrozenTrial],
    out_dir: Path,
    runner: Runner | None = None,
) -> list[dict[str, Any]]:
    """Write each trial as a checkpoint with its evaluation; return (and save) one record per trial."""
    if runner is None:
        from compress.pipeline import run

        runner = run
    shape = ModelShape(**study.user_attrs["model_shape"])
    records = []
    for trial in trials:
        folder = out_dir / "pareto" / f"trial-{trial.number}"
        log.info("materializing trial %d → %s", trial.number, folder)
        result = runner(trial_recipe(recipe, trial, shape, folder))
        records.append(
            {
                "trial": trial.number,
                "values": list(trial.values or []),
                "checkpoint": str(result.checkpoint),
                "sizes": result.report.get("sizes", {}),
                "evaluation": result.report.get("evaluation", {}),
            }
        )
    (out_dir / "materialized.json").write_text(json.dumps(records, indent=1, default=str) + "\n")
    (out_dir / "materialized.md").write_text(materialized_markdown(records, study))
    return records


def materialized_markdown(records: list[dict[str, Any]], study: Study) -> str:
    names = study.user_attrs.get("objectives", [])
    metrics = list(dict.fromkeys(row["metric"] for r in records for row in r["evaluation"].get("rows", [])))
    header = ["trial", *(f"search {n}" for n in names), "parameters", *metrics, "checkpoint"]
    lines = ["# Materialized trials", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        rows = {row["metric"]: row for row in r["evaluation"].get("rows", [])}
        cells = [str(r["trial"]), *(f"{v:.4g}" for v in r["values"]), f"{r['sizes'].get('params_after', '')}"]
        for m in metrics:
            row = rows.get(m)
            recovery = row.get("recovery") if row else None
            cells.append("" if row is None else f"{row['compressed']:.4g}" + (f" ({recovery:.1%})" if recovery else ""))
        cells.append(f"`{r['checkpoint']}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
