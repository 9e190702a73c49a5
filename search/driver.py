"""The study lifecycle: open or resume the study, seed it once, run trials until the target, stop on failure.

- **Resume.** The study is created once and loaded afterwards (same name, same storage): completed trials are
  kept, ``search.trials`` is the *total* target (complete + pruned trials), so a rerun only runs the remainder.
  Seeds are enqueued once per study, by the worker that created it.
- **Storage** (SQLite by default, PostgreSQL for many workers, heartbeats): :mod:`search.storage`.
- **Trials** (overlay → measure, structural constraints first, duplicates reused): :mod:`search.trial`.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.study import MaxTrialsCallback, Study
from optuna.trial import FrozenTrial, TrialState

from compress.recipe import PruneConfig, PruneStep, Recipe
from quant.errors import InputError
from search.config import SearchRecipe
from search.samplers import build_sampler
from search.seeds import Allocation, PuzzleAllocation, check_point, seed_params
from search.space import ModelShape, distributions, first_step, overlay
from search.storage import open_storage, shown_url, worker_index
from search.trial import FINISHED, Evaluator, TrialObjective

log = logging.getLogger("secateurs")

EXPLICIT_WIDTHS = ("attn_keep", "mlp_keep", "attn_groups", "mlp_channels")


SessionFactory = Callable[[Recipe], Evaluator]


class SearchFailed(RuntimeError):
    """A worker stopped because its trials keep failing (the errors are on the trials)."""


def open_session(recipe: Recipe) -> Evaluator:
    """The real evaluator: the dense model, calibration and statistics loaded once per worker."""
    from compress.session import Session

    return Session.open(recipe)


def model_shape(session: Evaluator, base: Recipe) -> ModelShape:
    prune = first_step(base, PruneStep)
    return ModelShape(
        num_layers=int(session.num_layers),
        n_kv=int(session.n_kv),
        intermediate_size=int(session.intermediate_size),
        mlp_step=prune.prune.mlp_step if prune is not None else 32,
        layers_prefix=session.layers_prefix,
    )


def session_allocation(session: Evaluator, base: Recipe) -> Allocation | None:
    """FLAP's global (AL-AM) widths at a ratio, from the session's dense statistics (the base prune step's
    settings, without its explicit widths)."""
    prune = first_step(base, PruneStep)
    if prune is None:
        return None
    settings = prune.prune.model_dump(exclude={"structure", "ratio", "uniform_rounding", *EXPLICIT_WIDTHS})

    def widths(ratio: float) -> tuple[list[int], list[int]]:
        return session.allocation(PruneConfig.model_validate({**settings, "ratio": ratio, "structure": "AL-AM"}))

    return widths


def puzzle_allocation(session: Evaluator, base: Recipe) -> PuzzleAllocation | None:
    """Puzzle-MIP widths at a ratio (``kind: puzzle`` seeds) from the session's dense model, statistics and
    calibration (the base prune step's ``puzzle`` settings, else the defaults); None for an evaluator without a
    dense-model cache (the seed is then skipped with a log line)."""
    cache = getattr(session, "cache", None)
    if cache is None or not hasattr(cache, "dense"):
        return None
    from compress.puzzle.config import PuzzleConfig
    from compress.puzzle.step import puzzle_widths

    prune = first_step(base, PruneStep)
    default = prune.prune.puzzle if prune is not None and prune.prune.puzzle is not None else PuzzleConfig()

    def widths(ratio: float, settings: PuzzleConfig | None) -> tuple[list[int], list[int]]:
        cfg = settings if settings is not None else default
        return puzzle_widths(cache.dense, cache.arch, cache.stats, cache.calibration, cfg, ratio)

    return widths


def _wait_for_attr(study: Study, key: str, seconds: float = 10.0) -> Any:
    """The creator sets the study's attributes right after creating it; a worker that loses the race waits."""
    deadline = time.monotonic() + seconds
    while key not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    return study.user_attrs.get(key)


def open_study(recipe: SearchRecipe, storage: RDBStorage, shape: ModelShape) -> tuple[Study, bool]:
    """Create the study, or load it when it exists (then check that it is the same search)."""
    name, cfg = recipe.study_name, recipe.search
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=cfg.directions)
        # the creator seeds the study (see enqueue_seeds); claimed first, so no other worker ever does
        study.set_user_attr("seeds_enqueued", 0)
        study.set_user_attr("fingerprint", recipe.fingerprint())
        study.set_user_attr("model_shape", shape.as_dict())
        study.set_user_attr("objectives", cfg.metric_names)
        study.set_user_attr("constraints", [c.describe() for c in cfg.constraints])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(cfg.metric_names)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
    if [d.name.lower() for d in study.directions] != cfg.directions:
        raise InputError(f"study {name!r} exists with other objectives; choose a new name with --study")
    fingerprint = _wait_for_attr(study, "fingerprint")
    if fingerprint is not None and fingerprint != recipe.fingerprint():
        raise InputError(
            f"study {name!r} in this storage was made by a different search space, objectives or base recipe; "
            "resume it with the same recipe or choose a new name with --study"
        )
    return study, False


def enqueue_seeds(
    study: Study,
    recipe: SearchRecipe,
    shape: ModelShape,
    dists: dict[str, BaseDistribution],
    alloc: Allocation | None,
    created: bool,
    puzzle: PuzzleAllocation | None = None,
) -> int:
    """Enqueue the recipe's seeds once per study: by the worker that created it (a worker that died between the
    two leaves the study unseeded, which costs the sampler a head start, not a trial)."""
    if not created:
        return 0
    points = []
    for index, seed in enumerate(recipe.search.seeds):
        params = seed_params(seed, recipe.search.space, shape, dists, recipe.base, alloc, puzzle)
        if params is not None:
            check_point(params, dists, f"search.seeds.{index}")
            points.append((seed.label(params.get("ratio", seed.ratio or 0.0)), params))
    for label, params in points:
        study.enqueue_trial(params, user_attrs={"seed": label}, skip_if_exists=True)
    study.set_user_attr("seeds_enqueued", len(points))
    return len(points)


class Progress:
    """One line per finished trial: values, feasibility, time, and where the study stands."""

    def __init__(self, target: int, metric_names: list[str]) -> None:
        self.target, self.metric_names = target, metric_names

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        counts = {state: 0 for state in TrialState}
        for other in study.get_trials(deepcopy=False):
            counts[other.state] += 1
        done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if trial.state == TrialState.COMPLETE and trial.values is not None:
            what = " ".join(f"{m}={v:.4g}" for m, v in zip(self.metric_names, trial.values, strict=True))
            what += "" if trial.user_attrs.get("feasible", True) else " (infeasible)"
        elif trial.state == TrialState.PRUNED:
            what = "pruned: " + str(trial.user_attrs.get("pruned", "duplicate"))
        else:
            what = "failed: " + str(trial.user_attrs.get("error", "objective returned no valid values"))
        note = f" (duplicate of {trial.user_attrs['duplicate_of']})" if "duplicate_of" in trial.user_attrs else ""
        log.info(
            "trial %d %s%s  %.1fs  [%d/%d done, %d running, %d failed]",
            trial.number, what, note, float(trial.user_attrs.get("seconds", 0.0)), done, self.target,
            counts[TrialState.RUNNING], counts[TrialState.FAIL],
        )  # fmt: skip


class FailureGuard:
    """Stop this worker after ``limit`` failed trials in a row (a broken environment, not a bad candidate)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.streak = limit, 0

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        self.streak = self.streak + 1 if trial.state == TrialState.FAIL else 0
        if self.streak >= self.limit:
            raise SearchFailed(f"{self.streak} trials failed in a row; last: {trial.user_attrs.get('error')}")


def collect_garbage(study: Study, trial: FrozenTrial) -> None:
    """Free the trial's compressed model copy (reference cycles in modules, hooks) after a real measurement;
    skipped after a cheap trial, where a full collection of a torch process (~0.2 s) would dominate."""
    if float(trial.user_attrs.get("seconds", 0.0)) > 1.0:
        gc.collect()


def finished_count(study: Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_search(
    recipe: SearchRecipe,
    *,
    storage: str | None = None,
    trials: int | None = None,
    worker: int | None = None,
    session_factory: SessionFactory = open_session,
) -> Study:
    """Run (or continue) the study of ``recipe`` until it has ``trials`` finished trials; return it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = recipe.search
    target = trials if trials is not None else cfg.trials
    url = storage or recipe.storage_url
    check_storage_url(url)  # a malformed URL fails before the model loads; nothing is created yet
    session = session_factory(recipe.base)
    shape = model_shape(session, recipe.base)
    dists = distributions(cfg.space, shape)
    check_overlay(recipe, dists, shape)
    rdb = open_storage(url, cfg.heartbeat)  # only now: a rejected model or space leaves no study database behind
    study, created = open_study(recipe, rdb, shape)
    alloc, puzzle = session_allocation(session, recipe.base), puzzle_allocation(session, recipe.base)
    enqueued = enqueue_seeds(study, recipe, shape, dists, alloc, created, puzzle)
    existing = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    seed = cfg.sampler.seed if cfg.sampler.seed is not None else recipe.base.seed
    # the seed moves with the study's state and the worker, so a resumed or parallel worker does not replay
    # the random proposals of an earlier one; a fresh single-worker run is deterministic under the recipe seed
    effective = (seed + 7919 * existing + 104729 * worker_index(url, worker)) % 2**31
    study.sampler = build_sampler(cfg.sampler, effective)
    done = finished_count(study)
    log.info(
        "study %r (%s): %s, %d/%d trials done%s; sampler %s seed %d",
        recipe.study_name, shown_url(url), "created" if created else "resumed", done, target,
        f", {enqueued} seeds enqueued" if enqueued else "", cfg.sampler.name, effective,
    )  # fmt: skip
    if done < target:
        objective = TrialObjective(recipe, session, shape, dists)
        study.optimize(
            objective,
            callbacks=[
                Progress(target, cfg.metric_names),
                FailureGuard(cfg.max_consecutive_failures),
                MaxTrialsCallback(target, states=FINISHED),
                collect_garbage,
            ],
            catch=(Exception,),
        )
        if objective.input_error is not None:
            raise objective.input_error
    return study


def check_storage_url(url: str) -> None:
    """InputError when ``url`` is not a database URL (parsed only: nothing is connected to or created)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise InputError(f"--storage {shown_url(url)!r}: not a database URL (e.g. sqlite:///path/search.db)") from None


def check_overlay(recipe: SearchRecipe, dists: dict[str, BaseDistribution], shape: ModelShape) -> None:
    """Overlay two points of the space (every parameter at its first, then at its last value) and validate the
    recipe, so that a space the base recipe cannot express fails at start-up with exit code 2, not trial by trial."""
    for end in (0, -1):  # both ends of every range (an invalid upper end would otherwise fail in a trial)
        probe = {
            name: getattr(d, "choices", [getattr(d, "low", None), getattr(d, "high", None)])[end]
            for name, d in dists.items()
        }
        overlay(recipe.base, probe, recipe.search.space, shape, f"{recipe.origin} (search.space overlay)")
