"""Layer streaming (compress.stream): the streamed run writes the same checkpoint as the in-memory run, with at
most one decoder layer in memory, and leaves nothing behind when it fails."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import compress.stream.engine as engine
from compress.pipeline import run
from compress.stream.writer import TensorEntry, write_streaming
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny3")
    build_tiny("qwen2", num_hidden_layers=3).save_pretrained(folder)  # qwen2: q/k/v biases, tied embeddings
    build_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    build_tiny("llama", num_hidden_layers=3, tie_word_embeddings=False).save_pretrained(folder, max_shard_size="40KB")
    build_tiny_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def _run(model_dir, out, steps, stream, **extra):
    recipe = {"model": str(model_dir), "stream": stream, "calibration": CALIBRATION, "steps": steps,
              "output": {"dir": str(out)}, "evaluation": None, **extra}  # fmt: skip
    return run(recipe)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


STEPS = {
    "flap+rtn": [{"prune": {"ratio": 0.3}}, {"quantize": {"dtypes": "int4_asym", "group_size": 16}}],
    "progressive+gptq": [
        {"prune": {"ratio": 0.3, "method": "wanda-sp", "statistics": "progressive"}},
        {"quantize": {"dtypes": "bitmod4", "group_size": 16, "method": "gptq"}},
    ],
    "awq": [{"quantize": {"dtypes": "int4_asym", "group_size": 16, "method": "awq"}}],
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_streamed_checkpoint_is_byte_identical_to_the_in_memory_one(model_dir, tmp_path, name):
    dense = _run(model_dir, tmp_path / "memory", STEPS[name], stream=False)
    streamed = _run(model_dir, tmp_path / "stream", STEPS[name], stream=True)
    assert "stream" not in dense.report and len(streamed.report["stream"]["layer_seconds"]) == 3
    for file in ("model.safetensors", "config.json"):
        assert _digest(dense.checkpoint / file) == _digest(streamed.checkpoint / file), file
    a, b = (json.loads((r.checkpoint / "secateurs.json").read_text()) for r in (dense, streamed))
    assert a["steps"] == b["steps"] and a["sizes"] == b["sizes"] and a["tensors"] == b["tensors"]
    assert streamed.report["reload_max_abs_logit_diff"] == 0.0
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(streamed.model(input_ids=ids).logits, dense.model(input_ids=ids).logits, rtol=0, atol=0)


def test_sharded_untied_source_streams(sharded_dir, tmp_path):
    steps = STEPS["flap+rtn"]
    dense = _run(sharded_dir, tmp_path / "memory", steps, stream=False)
    streamed = _run(sharded_dir, tmp_path / "stream", steps, stream=True)
    assert _digest(dense.checkpoint / "model.safetensors") == _digest(streamed.checkpoint / "model.safetensors")


def test_at_most_one_decoder_layer_is_in_memory(model_dir, tmp_path, monkeypatch):
    seen = []
    original = engine.Streamer.load

    def load(self, index):
        layer = original(self, index)
        seen.append(sum(any(p.device.type != "meta" for p in m.parameters()) for m in self.layers))
        return layer

    monkeypatch.setattr(engine.Streamer, "load", load)
    _run(model_dir, tmp_path / "out", STEPS["flap+rtn"], stream=True)
    assert len(seen) == 6 and max(seen) == 1  # statistics pass + main pass, three layers each


def test_failure_leaves_nothing_behind(model_dir, tmp_path, monkeypatch):
    def broken(self, index, layer):
        if index == 1:
            raise RuntimeError("disk full")
        return original(self, index, layer)

    original = engine.Streamer.stage
    monkeypatch.setattr(engine.Streamer, "stage", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(model_dir, tmp_path / "out", STEPS["flap+rtn"], stream=True)
    assert list(tmp_path.iterdir()) == []


def test_stream_true_names_what_prevents_it(model_dir, tmp_path):
    with pytest.raises(InputError, match="evaluation needs the whole model"):
        _run(model_dir, tmp_path / "a", STEPS["awq"], stream=True, evaluation={"lm_eval": None})
    distill = [{"prune": {"ratio": 0.3}}, {"distill": {"samples": 2, "global_steps": 1}}]
    with pytest.raises(InputError, match=r"steps.1: distill global_steps \(global KD\)"):
        _run(model_dir, tmp_path / "b", distill, stream=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_streaming_writer_matches_save_file_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "z.codes": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "c.ids": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "m.half": torch.randn(4, generator=g).half(),
        "e.empty": torch.zeros(0),
    }
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    entries = [TensorEntry(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    write_streaming(tmp_path / "ours.safetensors", entries, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_stream_true_needs_a_local_safetensors_folder(tmp_path):
    with pytest.raises(InputError, match="stream: true needs a local"):
        _run("someorg/some-model", tmp_path / "out", STEPS["awq"], stream=True)
