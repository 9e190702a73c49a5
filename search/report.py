"""What a search leaves behind: every trial as CSV and JSON, the Pareto front as a table and a plot.

Files (in the recipe's ``output.dir`` unless told otherwise): ``trials.csv``, ``trials.json``, ``pareto.md``,
``pareto.png``. The front holds the complete, feasible, non-dominated trials under the study's directions.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.space import ModelShape, summarize


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one."""
    better = False
    for x, y, direction in zip(a, b, directions, strict=True):
        if direction == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        better = better or x < y
    return better


def pareto_indices(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input order."""
    return [
        i for i, p in enumerate(points) if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)
    ]


def feasible_complete(study: Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if t.user_attrs.get("feasible", True) and t.values is not None]


def pareto_trials(study: Study) -> list[FrozenTrial]:
    """The feasible Pareto front, sorted by the first objective (best first); re-proposals of a point already
    measured (``duplicate_of``) are left out."""
    candidates = [t for t in feasible_complete(study) if "duplicate_of" not in t.user_attrs]
    directions = [d.name.lower() for d in study.directions]
    front = [candidates[i] for i in pareto_indices([t.values for t in candidates], directions)]
    sign = -1.0 if directions[0] == "maximize" else 1.0
    return sorted(front, key=lambda t: (sign * t.values[0], t.number))


def trial_record(trial: FrozenTrial, metric_names: Sequence[str]) -> dict[str, Any]:
    """One trial as plain data (JSON export)."""
    attrs = trial.user_attrs
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": dict(zip(metric_names, trial.values, strict=True)) if trial.values else None,
        "params": dict(trial.params),
        "metrics": attrs.get("metrics", {}),
        "constraints": dict(trial.constraints) or None,
        "feasible": attrs.get("feasible"),
        "seed": attrs.get("seed"),
        "worker": attrs.get("worker"),
        "duplicate_of": attrs.get("duplicate_of"),
        "retried_from": trial.system_attrs.get("failed_trial"),  # set by RetryHeartbeatStaleTrialCallback
        "pruned": attrs.get("pruned"),
        "error": attrs.get("error"),
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "duration_s": duration,
    }


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            prefix = {"values": "value", "params": "param", "metrics": "metric", "constraints": "constraint"}[key]
            row.update({f"{prefix}.{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            row[key] = json.dumps(value)
        else:
            row[key] = value
    return row


def trials_csv(records: list[dict[str, Any]]) -> str:
    rows = [_flat(r) for r in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def pareto_markdown(study: Study, front: list[FrozenTrial], metric_names: Sequence[str], shape: ModelShape) -> str:
    """The front as a markdown table: objectives, the other measured metrics, a summary of the parameters."""
    extra = list(dict.fromkeys(k for t in front for k in t.user_attrs.get("metrics", {}) if k not in metric_names))
    arrows = ["↓" if d.name == "MINIMIZE" else "↑" for d in study.directions]
    header = ["trial", *(f"{m} {a}" for m, a in zip(metric_names, arrows, strict=True)), *extra, "candidate"]
    lines = [
        f"# Pareto front of study `{study.study_name}`",
        "",
        f"{len(front)} non-dominated of {len(feasible_complete(study))} feasible complete trials "
        f"({len(study.trials)} trials in all).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for t in front:
        metrics = t.user_attrs.get("metrics", {})
        cells = [str(t.number), *(_fmt(v) for v in t.values)]
        cells += [_fmt(metrics[k]) if k in metrics else "" for k in extra]
        cells.append(summarize(t.params, shape) + (f" ({t.user_attrs['seed']})" if "seed" in t.user_attrs else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(study: Study, front: list[FrozenTrial], metric_names: Sequence[str], path: Path) -> None:
    """Scatter of every complete trial for each pair of objectives (one panel per pair), front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    n = len(metric_names)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)] or [(-1, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False)
    front_numbers = {t.number for t in front}
    for ax, (i, j) in zip(axes[0], pairs, strict=True):

        def coords(trials: list[FrozenTrial], i: int = i, j: int = j) -> tuple[list[float], list[float]]:
            xs = [float(t.number) if i < 0 else t.values[i] for t in trials]
            return xs, [t.values[j] for t in trials]

        feasible = [t for t in complete if t.user_attrs.get("feasible", True) and t.number not in front_numbers]
        infeasible = [t for t in complete if not t.user_attrs.get("feasible", True)]
        on_front = sorted((t for t in complete if t.number in front_numbers), key=lambda t: coords([t])[0][0])
        ax.scatter(*coords(feasible), s=18, c="0.6", label="feasible")
        if infeasible:
            ax.scatter(*coords(infeasible), s=18, c="tab:red", marker="x", label="infeasible")
        ax.plot(*coords(on_front), "o-", c="tab:blue", ms=6, label="Pareto front")
        for t in on_front:
            ax.annotate(str(t.number), (coords([t])[0][0], coords([t])[1][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("trial" if i < 0 else metric_names[i])
        ax.set_ylabel(metric_names[j])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study {study.study_name}: {len(complete)} complete trials, {len(front)} on the front")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    """Atomic write: several workers may finish at the same time and all write the report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(study: Study, out_dir: Path) -> dict[str, Path]:
    """Write trials.csv, trials.json, pareto.md and pareto.png into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_names = (
        study.user_attrs.get("objectives")
        or study.metric_names
        or [f"objective_{i}" for i in range(len(study.directions))]
    )
    shape = ModelShape(**study.user_attrs["model_shape"])
    records = [trial_record(t, metric_names) for t in study.get_trials(deepcopy=False)]
    front = pareto_trials(study)
    paths = {name: out_dir / name for name in ("trials.csv", "trials.json", "pareto.md", "pareto.png")}
    _write(paths["trials.csv"], trials_csv(records))
    _write(paths["trials.json"], json.dumps(records, indent=1, default=str) + "\n")
    _write(paths["pareto.md"], pareto_markdown(study, front, metric_names, shape))
    tmp_png = out_dir / f".pareto.{os.getpid()}.png"
    plot_pareto(study, front, metric_names, tmp_png)
    tmp_png.replace(paths["pareto.png"])
    return paths
