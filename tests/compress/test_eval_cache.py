"""Dense-baseline cache: a hit returns the stored result without evaluating; any change of model, data or protocol
is a miss."""

import torch

from compress.eval_cache import cached_evaluation, model_tensor_sha256
from compress.recipe import PerplexityConfig
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


class CountingEvaluate:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, tokenizer, ppl, lm_eval, seed, options):
        self.calls += 1
        return {"metrics": {"heldout/perplexity": float(self.calls)}, "stderr": {}, "protocol": {"seed": seed}}


def test_hit_reuses_and_any_change_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SECATEURS_EVAL_CACHE", "1")  # tests/compress/conftest.py turns it off elsewhere
    model, tokenizer = build_tiny("llama"), build_tiny_tokenizer(tmp_path / "tok")
    ppl = PerplexityConfig(seq_len=32, max_windows=2)
    evaluate = CountingEvaluate()

    first = cached_evaluation(model, tokenizer, ppl, None, 0, evaluate=evaluate)
    again = cached_evaluation(model, tokenizer, ppl, None, 0, evaluate=evaluate)
    assert evaluate.calls == 1 and not first["cache"]["hit"] and again["cache"]["hit"]
    assert again["metrics"] == first["metrics"] and again["cache"]["key"] == first["cache"]["key"]
    assert again["cache"]["computed_seconds"] == first["cache"]["seconds"]

    cached_evaluation(model, tokenizer, ppl, None, 1, evaluate=evaluate)  # seed
    cached_evaluation(model, tokenizer, PerplexityConfig(seq_len=32, max_windows=3), None, 0, evaluate=evaluate)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3  # one weight (tied with the embedding)
    cached_evaluation(model, tokenizer, ppl, None, 0, evaluate=evaluate)
    assert evaluate.calls == 4


def test_disabled_cache_always_evaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SECATEURS_EVAL_CACHE", "0")
    model, tokenizer = build_tiny("llama"), build_tiny_tokenizer(tmp_path / "tok")
    evaluate = CountingEvaluate()
    for _ in range(2):
        cached_evaluation(model, tokenizer, PerplexityConfig(seq_len=32, max_windows=2), None, 0, evaluate=evaluate)
    assert evaluate.calls == 2 and not (tmp_path / "cache").exists()


def test_tensor_hash_sees_dtype_and_values():
    a, b = build_tiny("llama", seed=0), build_tiny("llama", seed=0)
    assert model_tensor_sha256(a) == model_tensor_sha256(b)
    assert model_tensor_sha256(a) != model_tensor_sha256(build_tiny("llama", seed=1))
    assert model_tensor_sha256(a) != model_tensor_sha256(b.to(torch.bfloat16))
