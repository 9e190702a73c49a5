"""search/driver.py in-process with a synthetic session: resume, seeds, constraints, duplicates, failures."""

import optuna
import pytest
from optuna.trial import TrialState

from quant.errors import InputError
from search.config import parse_search_recipe
from search.driver import SearchFailed, run_search
from tests.search.synthetic import SyntheticSession, synthetic_recipe


def _run(tmp_path, trials=None, session=None, **search):
    recipe = parse_search_recipe(synthetic_recipe(str(tmp_path / "out"), **search), name="study")
    session = session or SyntheticSession()
    return run_search(recipe, trials=trials, session_factory=lambda _: session), session


def _states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_search_reaches_the_target_and_resume_runs_only_the_remainder(tmp_path):
    study, _ = _run(tmp_path, trials=4)
    assert _states(study) == [TrialState.COMPLETE] * 4
    first = [(t.number, t.params, t.values) for t in study.trials]
    study, session = _run(tmp_path, trials=7)
    assert _states(study) == [TrialState.COMPLETE] * 7
    assert [(t.number, t.params, t.values) for t in study.trials[:4]] == first  # nothing lost or redone
    assert len(session.calls) <= 3
    study, session = _run(tmp_path, trials=7)  # target reached: no trial at all
    assert len(study.trials) == 7 and session.calls == []


def test_trial_records_metrics_and_objectives(tmp_path):
    study, _ = _run(tmp_path, trials=2, objectives=["ppl", {"metric": "phi", "direction": "maximize"}])
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study.metric_names == ["ppl", "phi"]
    trial = study.trials[0]
    assert trial.values == [trial.user_attrs["metrics"]["ppl"], trial.user_attrs["metrics"]["phi"]]
    assert trial.user_attrs["worker"] and trial.user_attrs["feasible"] is True
    assert study.user_attrs["model_shape"]["num_layers"] == 4


def test_seeds_are_enqueued_once_and_run_first(tmp_path):
    seeds = [{"kind": "uniform", "ratio": 0.3}, {"kind": "flap-adaptive", "ratio": 0.3}]
    study, _ = _run(tmp_path, trials=3, seeds=seeds)
    assert [t.user_attrs.get("seed") for t in study.trials] == ["uniform ratio=0.3", "flap-adaptive ratio=0.3", None]
    assert study.trials[0].params == {"ratio": pytest.approx(0.3), "structure": "UL-UM"}
    assert study.trials[1].params == {"ratio": pytest.approx(0.3), "structure": "AL-AM"}
    study, _ = _run(tmp_path, trials=5, seeds=seeds)
    assert sum("seed" in t.user_attrs for t in study.trials) == 2


def test_keep_space_seeds_use_the_session_allocation(tmp_path):
    space = {"keep": {"block": 2, "skip_from": 2}, "bits": {"choices": [4, 8]}}
    study, session = _run(tmp_path, trials=1, space=space, seeds=[{"kind": "flap-adaptive", "ratio": 0.3}])
    params = study.trials[0].params
    # block means of the allocation ([3, 2, 1, 0] groups, [96, 64, 64, 32] channels), rounded half up
    assert params["attn_groups.L0-1"] == 3 and params["mlp_channels.L2-3"] == 64
    assert params["attn_skip.L2-3"] is False
    prune = session.recipes[0].steps[0].prune
    assert prune.attn_groups == [3, 3, 1, 1]
    assert [o.dtypes for o in session.recipes[0].steps[1].quantize.overrides] == ["bitmod4"]


def test_structural_constraints_prune_before_evaluation(tmp_path):
    constraints = [{"metric": "params", "max": 12000}, {"metric": "ppl", "max": 1000}]
    seeds = [{"kind": "uniform", "ratio": 0.1}, {"kind": "uniform", "ratio": 0.5}]
    study, session = _run(tmp_path, trials=2, constraints=constraints, seeds=seeds)
    light, heavy = study.trials[1], study.trials[0]  # ratio 0.5: 11,000 parameters; 0.1: 15,800
    assert heavy.state == TrialState.PRUNED and "params" in heavy.user_attrs["pruned"]
    assert heavy.constraints["params ≤ 12000"] > 0 and heavy.user_attrs["feasible"] is False
    assert light.state == TrialState.COMPLETE and light.user_attrs["feasible"] is True
    assert all(v <= 0 for v in light.constraints.values())
    assert session.calls == [["params"], ["params"], ["ppl"]]  # the pruned one was never evaluated


def test_same_parameters_are_not_measured_twice(tmp_path):
    seeds = [{"kind": "uniform", "ratio": 0.3}, {"kind": "uniform", "ratio": 0.3}]
    study, session = _run(tmp_path, trials=3, seeds=seeds, space={"ratio": {"low": 0.3, "high": 0.3}})
    assert len(session.calls) == 1
    assert [t.user_attrs.get("duplicate_of") for t in study.trials] == [None, 0, 0]
    assert study.trials[2].values == study.trials[0].values


class BrokenSession(SyntheticSession):
    def measure(self, recipe, objectives):
        raise RuntimeError("out of memory")


def test_failing_trials_are_recorded_and_the_worker_stops(tmp_path):
    with pytest.raises(SearchFailed, match="3 trials failed in a row; last: RuntimeError: out of memory"):
        _run(tmp_path, trials=10, session=BrokenSession())
    storage = f"sqlite:///{tmp_path / 'out' / 'search.db'}"
    study = optuna.load_study(study_name="study", storage=storage)
    assert _states(study) == [TrialState.FAIL] * 3
    assert study.trials[0].user_attrs["error"] == "RuntimeError: out of memory"


def test_a_changed_search_does_not_resume_the_old_study(tmp_path):
    _run(tmp_path, trials=1)
    with pytest.raises(InputError, match="different search space"):
        _run(tmp_path, trials=2, space={"ratio": {"low": 0.2, "high": 0.4}})
    with pytest.raises(InputError, match="other objectives"):
        _run(tmp_path, trials=2, objectives=["ppl", "phi"])


@pytest.mark.parametrize("sampler", ["nsga2", "nsga3", "tpe", "gp", "random"])
def test_every_sampler_runs_and_is_deterministic_under_the_seed(tmp_path, sampler):
    config = {"name": sampler, "population": 4, "startup_trials": 3}
    runs = [_run(tmp_path / str(i), trials=5, sampler=config)[0] for i in range(2)]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]
    assert _states(runs[0]) == [TrialState.COMPLETE] * 5


class InputErrorSession(SyntheticSession):
    def measure(self, recipe, objectives):
        raise InputError("objective phi: needs prune.statistics: dense")


def test_an_input_error_in_a_trial_stops_the_search_at_once(tmp_path):
    with pytest.raises(InputError, match="needs prune.statistics"):
        _run(tmp_path, trials=10, session=InputErrorSession())
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'out' / 'search.db'}")
    assert _states(study) == [TrialState.FAIL]


def test_a_space_the_recipe_cannot_express_fails_before_any_trial(tmp_path):
    with pytest.raises(InputError, match=r"search.space overlay\): field 'steps.1.quantize.group_size'"):
        _run(tmp_path, trials=3, space={"group_size": [0, 64]})
    assert not (tmp_path / "out" / "search.db").exists()  # storage opens only after the space validates
