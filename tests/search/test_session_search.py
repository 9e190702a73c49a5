"""The whole search on a real (tiny) model: compress.session.Session measures, the pipeline materialises."""

import json

import pytest
import yaml

from search.cli import main as search_cli

pytest.importorskip("compress.session")


@pytest.fixture(scope="module")
def model_dir(tiny4_dir):
    return tiny4_dir


def test_search_measures_real_candidates_and_materializes_the_front(model_dir, tmp_path):
    out = tmp_path / "out"
    recipe = {
        "model": str(model_dir),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": [{"prune": {"ratio": 0.3, "mlp_step": 32}}, {"quantize": {"dtypes": "int4_asym", "group_size": 16}}],
        "output": {"dir": str(out)},
        "evaluation": {"perplexity": {"seq_len": 64, "max_windows": 2}, "lm_eval": None},
        "search": {
            "trials": 4,
            "sampler": {"name": "tpe", "startup_trials": 2},
            "space": {
                "keep": {"block": 2, "skip_from": 2},
                "bits": {"block": 2, "choices": [4, 8], "datatypes": {4: ["int4_asym"], 8: ["int8_asym"]}},
            },
            "objectives": ["ppl", "bytes"],
            "constraints": [{"metric": "avg_bits", "max": 10}],  # group 16: 4-bit ≈ 6.2, 8-bit ≈ 11.7 stored bits
            "seeds": [{"kind": "uniform", "ratio": 0.3, "bits": 4}, {"kind": "flap-adaptive", "ratio": 0.3, "bits": 8}],
            "materialize": 1,
            "perplexity": {"data": "web:eval", "seq_len": 64, "max_windows": 2},  # = the evaluation, to compare
        },
    }
    path = tmp_path / "tiny-search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert search_cli([str(path)]) == 0

    trials = json.loads((out / "trials.json").read_text())
    assert [t["state"] for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"]
    uniform, adaptive = trials[0], trials[1]
    assert uniform["seed"] == "uniform ratio=0.3" and adaptive["seed"] == "flap-adaptive ratio=0.3"
    assert uniform["params"]["attn_groups.L0-1"] == 2 and uniform["params"]["mlp_channels.L2-3"] == 64
    # the 8-bit seed breaks the bit budget: pruned on its measured size, before any perplexity
    assert uniform["metrics"]["avg_bits"] < 10 < adaptive["metrics"]["avg_bits"]
    assert set(adaptive["metrics"]) == {"avg_bits"} and "avg_bits" in adaptive["pruned"]
    (chosen,) = json.loads((out / "materialized.json").read_text())
    assert (out / "pareto" / f"trial-{chosen['trial']}" / "model.safetensors").exists()
    rows = {row["metric"]: row["compressed"] for row in chosen["evaluation"]["rows"]}
    # the checkpoint written by the normal pipeline reproduces the perplexity the search measured
    assert rows["heldout/perplexity"] == pytest.approx(trials[chosen["trial"]]["values"]["ppl"], rel=1e-3)
