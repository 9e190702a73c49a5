"""secateurs eval: --num_fewshot, --batch_size auto, --output_path; stderr kept in the results."""

import json

import pytest

from compress.cli import _parser, main
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


def test_flags_parse():
    args = _parser().parse_args(
        ["eval", "m", "--num_fewshot", "2", "--batch_size", "auto", "--output_path", "o", "--apply_chat_template"]
    )
    assert (args.num_fewshot, args.batch_size, args.output_path, args.apply_chat_template) == (2, "auto", "o", True)
    assert _parser().parse_args(["eval", "m", "--batch-size", "4"]).batch_size == 4


def test_bad_batch_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["eval", "m", "--batch_size", "big"])
    assert exit_info.value.code == 2 and "positive integer or 'auto'" in capsys.readouterr().err


def test_eval_writes_results_with_stderr(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path / "m")
    build_tiny_tokenizer(tmp_path / "m")
    argv = ["eval", str(tmp_path / "m"), "--tasks", "secateurs_web_mc", "--limit", "8", "--ppl-windows", "1"]
    argv += ["--num_fewshot", "0", "--batch_size", "auto", "--output_path", str(tmp_path / "results")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(result["stderr"]) <= set(result["metrics"]) and "secateurs_web_mc/acc" in result["stderr"]
    assert result["stderr"]["secateurs_web_mc/acc"] > 0
    protocol = result["protocol"]["lm_eval"]
    assert protocol["num_fewshot"] == 0 and protocol["batch_size"] == "auto" and protocol["limit"] == 8
