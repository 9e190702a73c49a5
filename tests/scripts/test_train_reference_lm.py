"""scripts/train_reference_lm.py --smoke: the output folder loads with the Auto classes, has grouped-query
attention, and two runs write byte-identical weights (determinism). Two toy runs, a few seconds each."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_reference_lm.py"


def _run_smoke(out: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reference_lm")
    first, second = root / "first", root / "second"
    _run_smoke(first)
    _run_smoke(second)
    return first, second


def test_output_loads_with_auto_classes_and_has_gqa(smoke_runs: tuple[Path, Path]) -> None:
    out = smoke_runs[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>"
    text = "In the beginning God created the heavens and the earth."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_training_record(smoke_runs: tuple[Path, Path]) -> None:
    record = json.loads((smoke_runs[0] / "training.json").read_text())
    assert record["completed"] and record["smoke"]
    assert record["steps"] == record["steps_requested"] == 20
    assert record["tokens_seen"] == 20 * record["spec"]["batch_size"] * record["spec"]["seq_len"]
    assert record["eval"]["protocol"]["data"] == "web:eval"
    assert record["eval"]["protocol"]["seq_len"] == 256 and record["eval"]["protocol"]["windows"] == 64
    assert math.isfinite(record["eval"]["perplexity"]) and record["eval"]["perplexity"] < len(
        AutoTokenizer.from_pretrained(smoke_runs[0])
    )  # better than uniform: it learnt something
    assert record["versions"]["torch"] == torch.__version__


def test_two_runs_are_byte_identical(smoke_runs: tuple[Path, Path]) -> None:
    first, second = smoke_runs
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert not list(first.parent.glob(".*.tmp-*"))  # the temporary folders are gone


def test_refuses_to_overwrite_without_flag(smoke_runs: tuple[Path, Path]) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(smoke_runs[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--overwrite" in done.stderr
