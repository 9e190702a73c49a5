"""What a search optimises and what it must respect: objectives with directions, constraints as violations.

A metric is a name of the metric table :data:`compress.metrics.METRICS` (or ``lm_eval:<task>/<metric>``), which
also gives its default direction and whether it is structural.

Constraints are stored per trial as *violations* with ``Trial.set_constraint`` (optuna's convention: ≤ 0 feasible,
> 0 infeasible; every sampler and ``study.best_trials`` read them), relative to the bound so that a parameter
budget (1e8) and a bit budget (4.5) weigh alike when NSGA-II sums them.
Constraints on *structural* metrics (known once the steps ran, before any evaluation) are checked first, so an
infeasible candidate is pruned without its perplexity or lm-eval cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import field_validator, model_validator

from compress.metrics import Direction, direction, metric
from compress.recipe import Strict
from quant.errors import InputError


def check_metric(name: str) -> str:
    """``name`` itself when the metric table knows it; ValueError naming the known metrics otherwise."""
    try:
        metric(name)
    except InputError as err:
        raise ValueError(str(err)) from None
    return name


def default_direction(name: str) -> Direction:
    """The table's direction: higher is better for the proxy Φ and lm-eval accuracies; lower for perplexity,
    size, bits and latency."""
    return direction(name)


class ObjectiveConfig(Strict):
    """One objective: ``ppl`` (shorthand) or ``{metric: ppl, direction: minimize}``."""

    metric: str
    direction: Direction | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"metric": value} if isinstance(value, str) else value

    _known = field_validator("metric")(classmethod(lambda cls, v: check_metric(v)))

    @model_validator(mode="after")
    def _direction(self) -> ObjectiveConfig:
        if self.direction is None:
            self.direction = default_direction(self.metric)
        return self


class ConstraintConfig(Strict):
    """``metric ≤ max`` and/or ``metric ≥ min``, e.g. ``{metric: params, max: 1.0e8}``."""

    metric: str
    max: float | None = None
    min: float | None = None

    _known = field_validator("metric")(classmethod(lambda cls, v: check_metric(v)))

    @model_validator(mode="after")
    def _a_bound(self) -> ConstraintConfig:
        if self.max is None and self.min is None:
            raise ValueError("give max, min or both")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self

    @property
    def structural(self) -> bool:
        return metric(self.metric).structural

    def describe(self) -> str:
        bounds = [f"≥ {self.min:g}"] if self.min is not None else []
        bounds += [f"≤ {self.max:g}"] if self.max is not None else []
        return f"{self.metric} {' and '.join(bounds)}"


def violation(constraint: ConstraintConfig, value: float) -> float:
    """Relative violation of one constraint: ≤ 0 when ``value`` respects it (optuna's convention)."""
    if not math.isfinite(value):
        return math.inf
    worst = -math.inf
    if constraint.max is not None:
        worst = max(worst, (value - constraint.max) / max(abs(constraint.max), 1e-12))
    if constraint.min is not None:
        worst = max(worst, (constraint.min - value) / max(abs(constraint.min), 1e-12))
    return worst


def violations(constraints: Sequence[ConstraintConfig], metrics: dict[str, float]) -> list[float]:
    """One violation per constraint; a constraint whose metric is not measured yet counts as respected (0)."""
    return [violation(c, metrics[c.metric]) if c.metric in metrics else 0.0 for c in constraints]


def broken(constraints: Sequence[ConstraintConfig], metrics: dict[str, float]) -> list[str]:
    """Human-readable list of the constraints ``metrics`` break, e.g. ``["params 1.2e+08 > 1e+08"]``."""
    out = []
    for c, v in zip(constraints, violations(constraints, metrics), strict=True):
        if v > 0:
            out.append(f"{c.metric}={metrics[c.metric]:.4g} breaks {c.describe()}")
    return out


def metrics_to_measure(objectives: Sequence[ObjectiveConfig], constraints: Sequence[ConstraintConfig]) -> list[str]:
    """Every metric the objectives and constraints need, each once, in a stable order."""
    names = [o.metric for o in objectives] + [c.metric for c in constraints]
    return list(dict.fromkeys(names))
