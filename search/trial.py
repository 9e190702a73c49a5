"""One trial of the study: suggest → overlay → measure (structural constraints first) → objective values.

Constraints on structural metrics (known once the steps ran) are checked before any evaluation (infeasible →
pruned); a point already measured is not measured again. Metrics, violations and errors are stored as user
attributes (optuna-dashboard shows them).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Protocol

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from compress.recipe import EvaluationConfig, PerplexityConfig, PruneConfig, Recipe
from quant.errors import InputError
from search.config import SearchRecipe
from search.objectives import broken, metrics_to_measure, violations
from search.space import ModelShape, overlay, suggest

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards search.trials


class Evaluator(Protocol):
    """Everything the search uses of its evaluator (``compress.session.Session``; tests use a synthetic one):
    the dense shape, FLAP's allocation for seeds, and the measurement of a candidate recipe."""

    num_layers: int
    n_kv: int
    intermediate_size: int
    layers_prefix: str

    def allocation(self, cfg: PruneConfig) -> tuple[list[int], list[int]]: ...

    def measure(self, recipe: Recipe, objectives: list[str]) -> dict[str, float]: ...


def selection_recipe(recipe: Recipe, perplexity: PerplexityConfig) -> Recipe:
    """The trial's recipe with the ppl objective's protocol (selection text) in place of its evaluation."""
    ev = recipe.evaluation or EvaluationConfig(lm_eval=None)
    return recipe.model_copy(update={"evaluation": ev.model_copy(update={"perplexity": perplexity})})


class TrialObjective:
    """One trial: suggest → overlay → measure (structural constraints first) → objective values."""

    def __init__(
        self, recipe: SearchRecipe, session: Evaluator, shape: ModelShape, dists: dict[str, BaseDistribution]
    ) -> None:
        self.recipe, self.session, self.shape, self.dists = recipe, session, shape, dists
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.input_error: InputError | None = None

    def __call__(self, trial: Trial) -> list[float]:
        cfg = self.recipe.search
        trial.set_user_attr("worker", self.worker)
        params = suggest(trial, self.dists)
        earlier = _measured_before(trial, params)
        if earlier is not None:
            return self._reuse(trial, earlier)
        clock = time.perf_counter()
        try:
            recipe = overlay(self.recipe.base, params, cfg.space, self.shape, f"trial {trial.number}")
            recipe = selection_recipe(recipe, cfg.perplexity)
            early = [c for c in cfg.constraints if c.structural]
            metrics: dict[str, float] = {}
            if early:
                metrics.update(self.session.measure(recipe, metrics_to_measure([], early)))
                reasons = broken(early, metrics)
                if reasons:
                    self._record(trial, metrics, clock)
                    trial.set_user_attr("pruned", "infeasible before evaluation: " + "; ".join(reasons))
                    raise optuna.TrialPruned(reasons[0])
            rest = [m for m in metrics_to_measure(cfg.objectives, cfg.constraints) if m not in metrics]
            if rest:
                metrics.update(self.session.measure(recipe, rest))
        except optuna.TrialPruned:
            raise
        except InputError as err:  # the recipe, not the candidate: every trial would fail the same way
            self.input_error = err
            trial.set_user_attr("error", f"InputError: {err}")
            trial.study.stop()
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            trial.set_user_attr("seconds", round(time.perf_counter() - clock, 3))
            raise
        self._record(trial, metrics, clock)
        return [float(metrics[m]) for m in cfg.metric_names]

    def _record(self, trial: Trial, metrics: dict[str, float], clock: float) -> None:
        constraints = self.recipe.search.constraints
        values = violations(constraints, metrics)
        for constraint, value in zip(constraints, values, strict=True):
            trial.set_constraint(constraint.describe(), value)
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        trial.set_user_attr("feasible", all(v <= 0 for v in values))
        trial.set_user_attr("seconds", round(time.perf_counter() - clock, 3))

    def _reuse(self, trial: Trial, earlier: FrozenTrial) -> list[float]:
        """Same parameters as an earlier finished trial: copy its results instead of measuring again."""
        for key in ("metrics", "feasible", "pruned"):
            if key in earlier.user_attrs:
                trial.set_user_attr(key, earlier.user_attrs[key])
        for key, value in earlier.constraints.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("duplicate_of", earlier.number)
        trial.set_user_attr("seconds", 0.0)
        if earlier.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same parameters as pruned trial {earlier.number}")
        metrics = earlier.user_attrs["metrics"]
        return [float(metrics[m]) for m in self.recipe.search.metric_names]


def _measured_before(trial: Trial, params: dict[str, Any]) -> FrozenTrial | None:
    for other in trial.study.get_trials(deepcopy=False, states=FINISHED):
        if other.number != trial.number and other.params == params and "metrics" in other.user_attrs:
            return other
    return None
