"""Session: candidate recipes measured on one loaded model give what ``secateurs run`` gives for the same recipe."""

import pytest

from compress.metrics import direction
from compress.pipeline import as_recipe, run
from compress.quantize import weight_storage
from compress.session import Session
from quant.errors import InputError


@pytest.fixture(scope="module")
def model_dir(tiny4_dir):
    return tiny4_dir


def _recipe(model_dir, out, steps):
    return as_recipe(
        {
            "model": str(model_dir),
            "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
            "steps": steps,
            "output": {"dir": str(out)},
            "evaluation": {"perplexity": {"seq_len": 64, "max_windows": 2}, "lm_eval": None, "dense_baseline": False},
        }
    )


@pytest.fixture(scope="module")
def session(model_dir):
    return Session.open(_recipe(model_dir, "unused", []), proxy_samples=2, proxy_seq_len=24)


def test_measurement_equals_a_full_run(session, model_dir, tmp_path):
    steps = [
        {"prune": {"attn_keep": [1, 0.67, 0.34, 0], "mlp_keep": [1, 0.5, 0, 0.25], "mlp_step": 16}},
        {
            "quantize": {
                "dtypes": "bitmod4",
                "group_size": 16,
                "overrides": [{"match": r"layers\.1\.", "dtypes": "bitmod3"}],
            }
        },
    ]
    recipe = _recipe(model_dir, tmp_path / "out", steps)
    measured = session.measure(recipe, ["ppl", "params", "prunable_params", "avg_bits", "bytes", "phi"])
    result = run(recipe)
    assert measured["ppl"] == pytest.approx(result.report["evaluation"]["compressed"]["heldout/perplexity"], rel=1e-6)
    assert measured["params"] == result.report["sizes"]["params_after"]
    assert measured["prunable_params"] == result.report["sizes"]["prunable_after"]
    # every decoder linear is packed, so the average equals the packed storage of the written model
    assert measured["avg_bits"] == pytest.approx(weight_storage(result.model)["bits_per_weight"])
    assert 0 < measured["phi"] < 6  # 6 active sub-blocks, each ρ ≤ 1


def test_dense_candidate_has_phi_equal_to_the_number_of_sub_blocks(session, model_dir):
    measured = session.measure(_recipe(model_dir, "unused", []), ["phi", "phi_norm", "avg_bits", "latency_ms"])
    assert measured["phi"] == pytest.approx(8.0) and measured["phi_norm"] == pytest.approx(1.0)
    assert measured["avg_bits"] == 32.0 and measured["latency_ms"] > 0


def test_bad_objectives_and_steps_are_input_errors(session, model_dir):
    with pytest.raises(InputError, match="unknown metric .perplexity."):
        session.measure(_recipe(model_dir, "unused", []), ["perplexity"])
    with pytest.raises(InputError, match="nas step"):
        session.measure(_recipe(model_dir, "unused", [{"nas": {}}]), ["params"])
    assert direction("ppl") == "minimize" and direction("phi") == "maximize"
    assert direction("lm_eval:secateurs_web_mc/acc") == "maximize"
