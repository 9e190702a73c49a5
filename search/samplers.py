"""The recipe's ``search.sampler`` → an optuna sampler: genetic (NSGA-II, NSGA-III) or Bayesian (TPE, GP).

All of them read the constraint violations the driver stores on each trial (``Trial.set_constraint``): NSGA-II/III
rank feasible before infeasible (constrained domination), TPE and GP model feasibility. ``random`` is the baseline
every search should beat.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.samplers import BaseSampler

from search.config import SamplerConfig


def build_sampler(cfg: SamplerConfig, seed: int) -> BaseSampler:
    """A fresh sampler seeded with ``seed`` (the driver derives it from the recipe seed and the study's state)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.name in ("nsga2", "nsga3"):
            nsga = optuna.samplers.NSGAIISampler if cfg.name == "nsga2" else optuna.samplers.NSGAIIISampler
            return nsga(
                population_size=cfg.population,
                crossover_prob=cfg.crossover_prob,
                mutation_prob=cfg.mutation_prob,
                seed=seed,
            )
        if cfg.name == "tpe":
            return optuna.samplers.TPESampler(
                multivariate=True,
                n_startup_trials=cfg.startup_trials,
                constant_liar=True,  # parallel workers do not all propose the same point
                seed=seed,
            )
        if cfg.name == "gp":
            return optuna.samplers.GPSampler(n_startup_trials=cfg.startup_trials, seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)
