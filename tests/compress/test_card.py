"""Hub model cards: metadata parsed back by huggingface_hub, base_model mapping, tags, model-index, push errors."""

import logging

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from compress.card import DEFAULT_HUB_ID, hub_base_model, model_card, push_to_hub
from quant.errors import InputError


def _record(model="default", steps=({"prune": {"ratio": 0.2}},), evaluation=True):
    ev = {
        "compressed": {"heldout/perplexity": 21.5, "secateurs_web_mc/acc": 0.41},
        "dense": {"heldout/perplexity": 17.0, "secateurs_web_mc/acc": 0.43},
        "compressed_stderr": {"secateurs_web_mc/acc": 0.02},
        "dense_stderr": {"secateurs_web_mc/acc": 0.021},
        "rows": [
            {"metric": "heldout/perplexity", "compressed": 21.5, "dense": 17.0, "recovery": 0.79},
            {
                "metric": "secateurs_web_mc/acc",
                "compressed": 0.41,
                "dense": 0.43,
                "recovery": 0.95,
                "compressed_stderr": 0.02,
                "dense_stderr": 0.021,
                "within_stderr": True,
            },
        ],
        "protocol": {"perplexity": {"data": "web:eval", "seq_len": 256}},
    }
    return {
        "base_model": model,
        "recipe": {"model": model, "steps": list(steps), "output": {"dir": "out/tiny-flap"}},
        "steps_summary": ["flap AL-AM ratio=0.2"],
        "sizes": {"params_before": 1000, "params_after": 800},
        "evaluation": ev if evaluation else {},
    }


def test_default_run_card_parses_with_hub_metadata():
    card = ModelCard(model_card(_record()))
    data = card.data.to_dict()
    assert data["base_model"] == DEFAULT_HUB_ID
    assert data["base_model_relation"] == "finetune"
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["secateurs", "pruned", "structured-pruning"]
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "tiny-flap"
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert got == {
        ("web:eval", "perplexity"): 21.5,
        ("secateurs_web_mc", "acc"): 0.41,
        ("secateurs_web_mc", "acc_stderr"): 0.02,
    }
    assert "0.41 ± 0.02" in card.text and "within 1 stderr" in card.text


def test_quantize_only_card_says_quantized_not_pruned():
    data = ModelCard(model_card(_record(steps=[{"quantize": {"dtypes": "bitmod4"}}]))).data.to_dict()
    assert data["tags"] == ["secateurs", "quantized"]
    assert data["base_model_relation"] == "quantized"


def test_local_base_model_is_left_out_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="secateurs"):
        data = ModelCard(model_card(_record(model=str(tmp_path), evaluation=False))).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert "model-index" not in data
    assert "local path" in caplog.text


def test_license_is_inherited_from_a_local_base_model_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    assert ModelCard(model_card(_record(model=str(tmp_path)))).data.to_dict()["license"] == "mit"


@pytest.mark.parametrize(
    ("source", "expected"),
    [("default", DEFAULT_HUB_ID), ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"), ("./model", None), ("x.gguf", None)],
)
def test_hub_base_model(source, expected):
    assert hub_base_model(source) == expected


def test_push_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "README.md").write_text(model_card(_record()))
    with pytest.raises(InputError, match="push_to_hub 'me/model': upload failed"):
        push_to_hub(tmp_path, "me/model", private=True, token="hf_not_a_token", revision="v1")
