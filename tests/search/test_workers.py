"""Crashes and many workers, with real processes: kill -9 a worker mid-trial, then check the storage.

- SQLite: a search killed mid-trial and rerun keeps every completed trial and reaches its target.
- PostgreSQL (``SECATEURS_TEST_POSTGRES``, a server URL; ``.ci/run`` starts a throwaway server): three workers on
  one study, one killed mid-trial: its trial is failed through the heartbeat and retried, nothing else is lost.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from search.storage import database_url
from tests.search.synthetic import synthetic_recipe

ROOT = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get("SECATEURS_TEST_POSTGRES")


def _worker(recipe: Path, *args: str, delay: float) -> subprocess.Popen:
    env = {**os.environ, "SECATEURS_SYNTH_DELAY": str(delay)}
    command = [sys.executable, "-m", "tests.search.worker", str(recipe), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.2)


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as the storage holds them now ([] while the worker has not created it yet)."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).exists():
        return []
    try:
        return optuna.load_study(study_name=study, storage=database_url(storage)).get_trials(deepcopy=False)
    except KeyError:
        return []
    except sqlalchemy.exc.OperationalError:  # polled while the worker is still creating the schema in the new file
        return []


def _completed(trials: list[optuna.trial.FrozenTrial]) -> dict[int, tuple]:
    return {t.number: (t.params, t.values) for t in trials if t.state == TrialState.COMPLETE}


def _finish(process: subprocess.Popen, seconds: float = 120) -> str:
    output, _ = process.communicate(timeout=seconds)
    assert process.returncode == 0, output
    return output


def test_sqlite_search_killed_mid_trial_resumes_without_losing_trials(tmp_path):
    recipe = tmp_path / "search.yaml"
    data = synthetic_recipe(str(tmp_path / "out"), trials=10, heartbeat={"interval": 1, "grace": 2})
    recipe.write_text(yaml.safe_dump(data))
    storage = f"sqlite:///{tmp_path / 'out' / 'search.db'}"
    first = _worker(recipe, delay=1.5)  # slow enough that the search is still mid-trial when it is killed
    try:
        _wait_for(lambda: len(_completed(_trials(storage, "search"))) >= 3, 60, "three completed trials")
        _wait_for(lambda: any(t.state == TrialState.RUNNING for t in _trials(storage, "search")), 10, "a trial")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = _trials(storage, "search")
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    kept = _completed(before)
    assert len(killed) == 1 and len(kept) >= 3
    time.sleep(2)  # the heartbeat grace period of the recipe: the killed trial is now stale
    output = _finish(_worker(recipe, delay=0.05))
    assert "resumed" in output
    after = _trials(storage, "search")
    assert {n: v for n, v in _completed(after).items() if n in kept} == kept  # no completed trial lost
    assert len(_completed(after)) == 10  # the target, counted over both runs
    assert after[killed[0]].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == after[killed[0]].params


@pytest.mark.skipif(
    POSTGRES is None and not os.environ.get("SECATEURS_REQUIRE_POSTGRES"),
    reason="SECATEURS_TEST_POSTGRES (a PostgreSQL URL) is not set; .ci/run starts a server",
)
def test_three_postgres_workers_one_killed_mid_trial(tmp_path):
    assert POSTGRES, "SECATEURS_REQUIRE_POSTGRES is set but SECATEURS_TEST_POSTGRES is not"
    study = f"workers-{uuid.uuid4().hex[:8]}"
    seeds = [{"kind": "uniform", "ratio": 0.2}, {"kind": "flap-adaptive", "ratio": 0.2}]
    data = synthetic_recipe(str(tmp_path / "out"), trials=24, seeds=seeds, heartbeat={"interval": 1, "grace": 2})
    recipe = tmp_path / "search.yaml"
    recipe.write_text(yaml.safe_dump(data))
    args = ("--storage", POSTGRES, "--study", study)
    victim = _worker(recipe, *args, delay=600)  # its first trial never ends by itself
    me = f"{socket.gethostname()}:{victim.pid}"
    others: list[subprocess.Popen] = []
    try:

        def victim_running() -> bool:
            trials = _trials(POSTGRES, study)
            return any(t.state == TrialState.RUNNING and t.user_attrs.get("worker") == me for t in trials)

        _wait_for(victim_running, 60, "the victim's first trial")
        # the other two join while the victim is mid-trial; it is killed once they are under way, so that
        # enough of their work remains for the heartbeat grace period to pass before they finish
        others = [_worker(recipe, *args, "--worker", str(i), delay=0.5) for i in (1, 2)]
        _wait_for(lambda: len(_completed(_trials(POSTGRES, study))) >= 2, 60, "the other workers' trials")
        assert victim_running()
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    snapshot = _trials(POSTGRES, study)
    (killed,) = [t.number for t in snapshot if t.user_attrs.get("worker") == me]
    kept = _completed(snapshot)
    try:
        for process in others:
            _finish(process)
    finally:
        for process in others:
            if process.poll() is None:
                process.kill()
    final = _trials(POSTGRES, study)
    assert {n: v for n, v in _completed(final).items() if n in kept} == kept  # every completed trial kept
    assert final[killed].state == TrialState.FAIL  # marked by a surviving worker through the heartbeat
    retries = [t for t in final if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == final[killed].params and retries[0].user_attrs["worker"] != me
    assert len(_completed(final)) >= 24
    originals = [t for t in final if "seed" in t.user_attrs and "failed_trial" not in t.system_attrs]
    assert len(originals) == 2  # seeds enqueued once, although three workers opened the study
    assert len({t.user_attrs.get("worker") for t in final if t.state == TrialState.COMPLETE}) == 2
