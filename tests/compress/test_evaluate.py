"""lm-eval results → metrics and stderr; comparison rows mark differences within one standard error."""

import math

from compress.evaluate import comparison_rows, split_lm_eval_results, within_one_stderr


def test_split_keeps_stderr_and_drops_na():
    results = {
        "mc": {
            "alias": "mc",
            "acc,none": 0.4,
            "acc_stderr,none": 0.02,
            "acc_norm,none": 0.5,
            "acc_norm_stderr,none": "N/A",
        },
        "ppl": {"word_perplexity,none": 30.0, "word_perplexity_stderr,none": "N/A", "sample_len,none": 10},
    }
    metrics, stderr = split_lm_eval_results(results)
    assert metrics == {"mc/acc": 0.4, "mc/acc_norm": 0.5, "ppl/word_perplexity": 30.0}
    assert stderr == {"mc/acc": 0.02}


def test_within_one_stderr_uses_the_difference_standard_error():
    se = math.sqrt(0.03**2 + 0.04**2)  # 0.05
    assert within_one_stderr(0.50, 0.50 - 0.9 * se, 0.03, 0.04)
    assert not within_one_stderr(0.50, 0.50 - 1.1 * se, 0.03, 0.04)


def test_rows_carry_stderr_and_the_verdict():
    rows = comparison_rows(
        {"mc/acc": 0.45, "mc/f1": 0.60, "heldout/perplexity": 10.0},
        {"mc/acc": 0.44, "mc/f1": 0.40, "heldout/perplexity": 12.5},
        {"mc/acc": 0.02, "mc/f1": 0.02},
        {"mc/acc": 0.02, "mc/f1": 0.02},
    )
    by = {r["metric"]: r for r in rows}
    assert by["mc/acc"]["within_stderr"] is True and by["mc/acc"]["dense_stderr"] == 0.02
    assert by["mc/f1"]["within_stderr"] is False
    assert "within_stderr" not in by["heldout/perplexity"] and by["heldout/perplexity"]["recovery"] == 0.8


def test_several_perplexity_texts(tmp_path):
    """``evaluation.perplexity`` takes a list: the first text is heldout/perplexity, the others
    heldout/perplexity@<data>, each equal to that text measured alone; the single-text form is unchanged."""
    import pytest

    from compress.evaluate import evaluate_model, perplexity, perplexity_metric
    from compress.recipe import EvaluationConfig, PerplexityConfig, parse_recipe
    from quant.errors import InputError
    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    texts = [{"data": "web:eval", "seq_len": 32, "max_windows": 2}, {"data": "prose:eval", "seq_len": 32}]
    ev = parse_recipe({"evaluation": {"perplexity": texts, "lm_eval": None}}).evaluation
    assert ev is not None and ev.perplexity is not None and ev.perplexity.data == "web:eval"
    assert [t.data for t in ev.more_perplexity] == ["prose:eval"]
    assert EvaluationConfig.model_validate(ev.model_dump()) == ev  # the stored form parses back
    single = parse_recipe({"evaluation": {"perplexity": texts[0], "lm_eval": None}}).evaluation
    assert single is not None and isinstance(single.perplexity_texts(), PerplexityConfig)
    with pytest.raises(InputError, match="at least one text"):
        parse_recipe({"evaluation": {"perplexity": []}})
    model, tok = build_tiny("llama"), build_tiny_tokenizer(tmp_path)
    configs = ev.perplexity_texts()
    assert isinstance(configs, list)
    configs[1] = configs[1].model_copy(update={"max_windows": 2})
    result = evaluate_model(model, tok, configs, None, 0)
    assert set(result["metrics"]) == {"heldout/perplexity", "heldout/perplexity@prose:eval"}
    assert result["metrics"]["heldout/perplexity"] == perplexity(model, tok, configs[0])["perplexity"]
    assert result["metrics"][perplexity_metric("prose:eval")] == perplexity(model, tok, configs[1])["perplexity"]
    assert perplexity_metric("data/x.txt") == "heldout/perplexity@data|x.txt"
