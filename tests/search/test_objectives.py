"""search/objectives.py: metric names, default directions, constraint violations."""

import math

import pytest

from search.objectives import (
    ConstraintConfig,
    ObjectiveConfig,
    broken,
    default_direction,
    metrics_to_measure,
    violations,
)


@pytest.mark.parametrize(
    ("metric", "direction"),
    [
        ("ppl", "minimize"),
        ("phi", "maximize"),
        ("phi_norm", "maximize"),
        ("bytes", "minimize"),
        ("latency_ms", "minimize"),
        ("lm_eval:secateurs_web_mc/acc,none", "maximize"),
        ("lm_eval:secateurs_web_ppl/word_perplexity,none", "minimize"),
    ],
)
def test_default_directions(metric, direction):
    assert default_direction(metric) == direction
    assert ObjectiveConfig.model_validate(metric).direction == direction


def test_unknown_metric_and_explicit_direction():
    with pytest.raises(ValueError, match="unknown metric 'perplexity'"):
        ObjectiveConfig.model_validate("perplexity")
    assert ObjectiveConfig.model_validate({"metric": "phi", "direction": "minimize"}).direction == "minimize"


def test_violations_are_relative_to_the_bound():
    params = ConstraintConfig(metric="params", max=1e8)
    bits = ConstraintConfig(metric="avg_bits", min=3.0, max=4.5)
    assert violations([params, bits], {"params": 1.1e8, "avg_bits": 4.0}) == pytest.approx([0.1, -1 / 9])
    assert violations([params, bits], {"params": 0.5e8, "avg_bits": 2.4}) == pytest.approx([-0.5, 0.2])
    assert violations([params, bits], {"avg_bits": 5.4}) == pytest.approx([0.0, 0.2])  # unmeasured → respected
    assert violations([params], {"params": math.nan}) == [math.inf]
    assert broken([params, bits], {"params": 1.1e8, "avg_bits": 4.0}) == ["params=1.1e+08 breaks params ≤ 1e+08"]
    assert params.structural and not ConstraintConfig(metric="ppl", max=30).structural


def test_constraint_needs_a_bound():
    with pytest.raises(ValueError, match="give max, min or both"):
        ConstraintConfig(metric="params")
    with pytest.raises(ValueError, match="min 5.0 > max 4.0"):
        ConstraintConfig(metric="avg_bits", min=5, max=4)


def test_metrics_to_measure_lists_each_once():
    objectives = [ObjectiveConfig.model_validate(m) for m in ("ppl", "params")]
    constraints = [ConstraintConfig(metric="params", max=1), ConstraintConfig(metric="avg_bits", max=4)]
    assert metrics_to_measure(objectives, constraints) == ["ppl", "params", "avg_bits"]
