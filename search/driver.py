"""The search loop: an optuna study whose objective measures overlaid recipes with one loaded session.

- **Storage.** SQLite in the output folder by default; any optuna RDB URL (``postgresql://...``) lets workers on
  several machines share the study. Each worker is an ordinary process running this loop.
- **Resume.** The study is created once and loaded afterwards (same name, same storage): completed trials are
  kept, ``search.trials`` is the *total* target (complete + pruned trials), so a rerun only runs the remainder.
  Seeds are enqueued once per study, by the worker that created it.
- **Dead workers.** Running trials write heartbeats; the next worker to start a trial marks a trial silent for
  ``heartbeat.grace`` seconds as failed, and ``RetryHeartbeatStaleTrialCallback`` enqueues its parameters again.
- **Trials.** params → :func:`search.space.overlay` → ``parse_recipe`` → ``Session.measure``; constraints on
  structural metrics are checked before any evaluation (infeasible → pruned); a point already measured is not
  measured again. Metrics, violations and errors are stored as user attributes (optuna-dashboard shows them).
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import os
import socket
import sqlite3
import time
import warnings
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback, Study
from optuna.trial import FrozenTrial, Trial, TrialState

from compress.recipe import EvaluationConfig, PerplexityConfig, PruneConfig, Recipe, parse_recipe
from quant.errors import InputError
from search.config import HeartbeatConfig, SearchRecipe
from search.objectives import broken, metrics_to_measure, violations
from search.samplers import build_sampler
from search.seeds import Allocation, check_point, seed_params
from search.space import ModelShape, distributions, overlay, step_index, suggest

log = logging.getLogger("secateurs")

EXPLICIT_WIDTHS = ("attn_keep", "mlp_keep", "attn_groups", "mlp_channels")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards search.trials


class Evaluator(Protocol):
    """What the driver needs of ``compress.session.Session``: the dense shape and ``measure``."""

    num_layers: int
    n_kv: int
    intermediate_size: int

    def measure(self, recipe: Recipe, objectives: list[str]) -> dict[str, float]: ...


SessionFactory = Callable[[Recipe], Evaluator]


class SearchFailed(RuntimeError):
    """A worker stopped because its trials keep failing (the errors are on the trials)."""


def open_session(recipe: Recipe) -> Evaluator:
    """The real evaluator: the dense model, calibration and statistics loaded once per worker."""
    from compress.session import Session

    return Session.open(recipe)


def model_shape(session: Evaluator, base: dict[str, Any]) -> ModelShape:
    at = step_index(base, "prune")
    mlp_step = int(base["steps"][at]["prune"].get("mlp_step", 32)) if at is not None else 32
    return ModelShape(
        num_layers=int(session.num_layers),
        n_kv=int(session.n_kv),
        intermediate_size=int(session.intermediate_size),
        mlp_step=mlp_step,
        layers_prefix=str(getattr(session, "layers_prefix", "model.layers")),
    )


def session_allocation(session: Evaluator, base: dict[str, Any]) -> Allocation | None:
    """FLAP's global (AL-AM) widths at a ratio: ``session.allocation(PruneConfig)`` when the session has it,
    else the kept widths ``session.build`` records for a recipe whose only step is that prune step."""
    at = step_index(base, "prune")
    allocate, build = getattr(session, "allocation", None), getattr(session, "build", None)
    if at is None or (allocate is None and build is None):
        return None
    prune = {k: v for k, v in base["steps"][at]["prune"].items() if k not in EXPLICIT_WIDTHS}

    def widths(ratio: float) -> tuple[list[int], list[int]]:
        cfg = {**prune, "ratio": ratio, "structure": "AL-AM"}
        if allocate is not None:
            out = allocate(PruneConfig.model_validate(cfg))
        else:
            assert build is not None
            out = build(parse_recipe({**base, "steps": [{"prune": cfg}]}, "flap-adaptive seed")).steps[0]
        return list(out["kv_groups"]), list(out["intermediate_sizes"])

    return widths


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """WAL journal with synchronous=NORMAL: a killed process loses no committed trial (only a power cut could),
    readers do not block the writer, and a commit costs no fsync (10 ms each otherwise, ~20 per trial)."""
    connection = sqlite3.connect(path, timeout=60, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def database_url(url: str) -> str:
    """``postgresql://`` means psycopg (v3) to SQLAlchemy 2.1; use psycopg2 (the ``search`` extra) without it."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def shown_url(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str, heartbeat: HeartbeatConfig) -> RDBStorage:
    """RDB storage with heartbeats and a retry of stale trials; creates the SQLite file's folder."""
    url = database_url(url)
    engine: dict[str, Any] = {"pool_pre_ping": True}
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else None
    if path is not None and path not in ("", ":memory:"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = {"creator": functools.partial(_sqlite_connect, path)}
    try:
        with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental" since optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry),
            )
    except Exception as err:  # a bad URL, an unreachable server, a missing driver
        raise InputError(f"--storage {shown_url(url)!r}: {type(err).__name__}: {err}") from None


def worker_index(url: str, worker: int | None) -> int:
    """0 for a lone SQLite worker (deterministic); else distinct per process so workers sample differently."""
    if worker is not None:
        return worker
    if url.startswith("sqlite"):
        return 0
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_003


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
) -> int:
    """Enqueue the recipe's seeds once per study: by the worker that created it (a worker that died between the
    two leaves the study unseeded, which costs the sampler a head start, not a trial)."""
    if not created:
        return 0
    points = []
    for index, seed in enumerate(recipe.search.seeds):
        params = seed_params(seed, recipe.search.space, shape, dists, recipe.base, alloc)
        if params is not None:
            check_point(params, dists, f"search.seeds.{index}")
            points.append((seed.label(params.get("ratio", seed.ratio or 0.0)), params))
    for label, params in points:
        study.enqueue_trial(params, user_attrs={"seed": label}, skip_if_exists=True)
    study.set_user_attr("seeds_enqueued", len(points))
    return len(points)


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
            recipe = parse_recipe(overlay(self.recipe.base, params, cfg.space, self.shape), f"trial {trial.number}")
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
    rdb = open_storage(url, cfg.heartbeat)  # a bad URL fails before the model loads
    session = session_factory(parse_recipe(recipe.base, recipe.origin))
    shape = model_shape(session, recipe.base)
    dists = distributions(cfg.space, shape)
    check_overlay(recipe, dists, shape)
    study, created = open_study(recipe, rdb, shape)
    enqueued = enqueue_seeds(study, recipe, shape, dists, session_allocation(session, recipe.base), created)
    existing = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    seed = cfg.sampler.seed if cfg.sampler.seed is not None else int(recipe.base.get("seed", 0))
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


def check_overlay(recipe: SearchRecipe, dists: dict[str, BaseDistribution], shape: ModelShape) -> None:
    """Overlay one point of the space (every parameter at its first value) and validate the recipe, so that a
    space the base recipe cannot express fails at start-up with exit code 2, not trial by trial."""
    probe = {name: getattr(d, "choices", [getattr(d, "low", None)])[0] for name, d in dists.items()}
    parse_recipe(overlay(recipe.base, probe, recipe.search.space, shape), f"{recipe.origin} (search.space overlay)")
