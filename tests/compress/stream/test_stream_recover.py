"""Streamed recovery (compress.stream.recover): least-squares reconstruction and blockwise local distillation one
decoder layer at a time write the same checkpoint as the in-memory path (which walks the dense model and the
compressed model together), with at most one decoder layer in memory; global KD does not stream."""

import hashlib
import json

import pytest

import compress.stream.engine as engine
from compress.pipeline import run
from compress.recipe import parse_recipe
from compress.stream import not_streamable
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

CALIBRATION = {"data": "mix:calibration", "samples": 8, "seq_len": 32, "batch_size": 4}  # a mixture, as the recipes
LS = {"prune": {"ratio": 0.3, "reconstruct": "least_squares"}}
BLD = {"data": "web:calibration", "samples": 4, "seq_len": 16, "batch_size": 2, "steps": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny3")
    build_tiny("llama", num_hidden_layers=3).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def _run(model_dir, out, steps, stream):
    recipe = {"model": str(model_dir), "stream": stream, "calibration": CALIBRATION, "steps": steps,
              "output": {"dir": str(out)}, "evaluation": None}  # fmt: skip
    return run(recipe)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _without_seconds(steps):
    return [{k: v for k, v in step.items() if k != "seconds"} for step in steps]


STEPS = {
    "least-squares": [LS],
    "least-squares, linear replacement of removed sub-blocks": [
        {
            "prune": {
                **LS["prune"],
                "replacement": "linear",
                "replacement_rank": 4,
                "attn_groups": [3, 0, 2],
                "mlp_channels": [96, 48, 0],
            }
        }
    ],
    "flap+bld": [{"prune": {"ratio": 0.3}}, {"distill": BLD}],
    "least-squares+bld(compressed inputs)+rtn": [
        LS,
        {"distill": {**BLD, "inputs": "compressed", "train": "consumers"}},
        {"quantize": {"dtypes": "int4_asym", "group_size": 16}},
    ],
    "bld lora, no prune": [{"distill": {**BLD, "train": "lora", "lora_rank": 2}}],
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_streamed_recovery_is_byte_identical_to_the_in_memory_one(model_dir, tmp_path, name):
    memory = _run(model_dir, tmp_path / "memory", STEPS[name], stream=False)
    streamed = _run(model_dir, tmp_path / "stream", STEPS[name], stream=True)
    assert "stream" not in memory.report and len(streamed.report["stream"]["layer_seconds"]) == 3
    for file in ("model.safetensors", "config.json"):
        assert _digest(memory.checkpoint / file) == _digest(streamed.checkpoint / file), file
    a, b = (json.loads((r.checkpoint / "secateurs.json").read_text()) for r in (memory, streamed))
    assert _without_seconds(a["steps"]) == _without_seconds(b["steps"])
    assert a["sizes"] == b["sizes"] and a["tensors"] == b["tensors"]
    assert streamed.report["reload_max_abs_logit_diff"] == 0.0


def test_recovery_changes_the_weights(model_dir, tmp_path):
    """The comparison above is not vacuous: least squares and BLD each change the pruned checkpoint."""
    plain = _run(model_dir, tmp_path / "plain", [{"prune": {"ratio": 0.3}}], stream=True)
    refit = _run(model_dir, tmp_path / "refit", [LS], stream=True)
    bld = _run(model_dir, tmp_path / "bld", STEPS["flap+bld"], stream=True)
    digests = {_digest(r.checkpoint / "model.safetensors") for r in (plain, refit, bld)}
    assert len(digests) == 3
    assert len(bld.report["steps"][1]["block_loss"]) == 3


def test_at_most_one_decoder_layer_is_in_memory(model_dir, tmp_path, monkeypatch):
    seen = []
    original = engine.Streamer.load

    def load(self, index):
        layer = original(self, index)
        seen.append(sum(any(p.device.type != "meta" for p in m.parameters()) for m in self.layers))
        return layer

    monkeypatch.setattr(engine.Streamer, "load", load)
    _run(model_dir, tmp_path / "out", STEPS["least-squares+bld(compressed inputs)+rtn"], stream=True)
    assert len(seen) == 6 and max(seen) == 1  # statistics pass + main pass, three layers each


def test_failure_midway_leaves_nothing_behind(model_dir, tmp_path, monkeypatch):
    def broken(self, index, layer):
        if index == 1:
            raise RuntimeError("disk full")
        return original(self, index, layer)

    original = engine.Streamer.stage
    monkeypatch.setattr(engine.Streamer, "stage", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(model_dir, tmp_path / "out", STEPS["least-squares+bld(compressed inputs)+rtn"], stream=True)
    assert list(tmp_path.iterdir()) == []


def _reason(steps):
    return not_streamable(parse_recipe({"steps": steps}).steps, "packed")


def test_not_streamable_names_global_kd():
    assert _reason([LS, {"distill": BLD}, {"quantize": {"dtypes": "int4_asym"}}]) is None
    assert "global KD" in _reason([LS, {"distill": {**BLD, "global_steps": 2}}])
    assert "structure: puzzle" in _reason([{"prune": {"ratio": 0.3, "structure": "puzzle"}}])


def test_global_kd_with_stream_true_is_one_line_and_auto_loads_the_model(model_dir, tmp_path, caplog):
    steps = [LS, {"distill": {**BLD, "global_steps": 1}}]
    with pytest.raises(InputError, match="steps.1: distill global_steps"):
        _run(model_dir, tmp_path / "a", steps, stream=True)
    assert not (tmp_path / "a").exists()
    caplog.set_level("INFO", logger="secateurs")
    result = _run(model_dir, tmp_path / "b", steps, stream="auto")
    assert "stream" not in result.report and "global KD" in caplog.text


def test_least_squares_with_progressive_statistics_is_refused_streamed_too(model_dir, tmp_path):
    steps = [{"prune": {"ratio": 0.3, "reconstruct": "least_squares", "statistics": "progressive"}}]
    with pytest.raises(InputError, match="least_squares needs statistics: dense"):
        _run(model_dir, tmp_path / "out", steps, stream=True)


def test_an_unreadable_part_of_a_calibration_mixture_is_one_line_before_any_work(model_dir, tmp_path):
    recipe = {"model": str(model_dir), "calibration": {**CALIBRATION, "data": f"web:calibration*1+{tmp_path}/no.txt*1"},
              "steps": [LS], "output": {"dir": str(tmp_path / "out")}, "evaluation": None}  # fmt: skip
    with pytest.raises(InputError, match="no.txt does not exist"):
        run(recipe)
    assert not (tmp_path / "out").exists()


def test_unreadable_distill_data_is_one_line_before_any_work(model_dir, tmp_path, monkeypatch):
    def loading(*_args):
        raise AssertionError("the model was opened before the data were checked")

    monkeypatch.setattr("compress.pipeline.open_streamer", loading)
    steps = [LS, {"distill": {**BLD, "data": f"{tmp_path}/none.txt"}}]
    with pytest.raises(InputError, match="none.txt does not exist"):
        _run(model_dir, tmp_path / "out", steps, stream=True)
    assert not (tmp_path / "out").exists()
