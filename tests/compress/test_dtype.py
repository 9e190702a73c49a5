"""``dtype: auto`` and half-precision models end to end: prune + quantize + save in the checkpoint's own dtype, and a
fresh process that reloads the checkpoint computes the same logits bit for bit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compress.loading import resolve_dtype
from compress.pipeline import run
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
STEPS = [{"prune": {"ratio": 0.3}}, {"quantize": {"dtypes": "int4_asym", "group_size": 16}}]

RELOAD = """
import sys, torch
from compress.loading import load_model
model = load_model(sys.argv[1], dtype="auto").model
ids = torch.load(sys.argv[2], weights_only=True)
torch.save(model(input_ids=ids, use_cache=False).logits, sys.argv[3])
"""


def _model(folder: Path, dtype: torch.dtype) -> Path:
    build_tiny("llama", num_hidden_layers=3).to(dtype).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def _recipe(model: Path, out: Path, stream: bool) -> dict:
    return {"model": str(model), "stream": stream, "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
            "steps": STEPS, "output": {"dir": str(out)}, "evaluation": None}  # fmt: skip


def test_auto_is_the_checkpoints_own_dtype(tmp_path):
    assert resolve_dtype("auto", _model(tmp_path / "bf16", torch.bfloat16)) == torch.bfloat16
    assert resolve_dtype("auto", _model(tmp_path / "fp32", torch.float32)) == torch.float32
    assert resolve_dtype("float16", tmp_path / "fp32") == torch.float16
    assert resolve_dtype("auto", "org/hub-model") == "auto"  # transformers reads the Hub config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_round_trip_in_a_fresh_process(tmp_path, dtype):
    model = _model(tmp_path / "model", dtype)
    memory = run(_recipe(model, tmp_path / "memory", stream=False))
    streamed = run(_recipe(model, tmp_path / "stream", stream=True))
    ckpt = memory.checkpoint
    assert (ckpt / "model.safetensors").read_bytes() == (streamed.checkpoint / "model.safetensors").read_bytes()
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        floats = {f.get_tensor(n).dtype for n in f.keys() if f.get_tensor(n).is_floating_point()}
    assert dtype in floats and torch.float32 not in floats  # stored in the model's own dtype, not widened
    assert json.loads((ckpt / "secateurs.json").read_text())["recipe"]["dtype"] == "auto"
    assert next(memory.model.parameters()).dtype == dtype
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    fresh = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        expected = memory.model(input_ids=ids, use_cache=False).logits
    assert fresh.dtype == dtype and torch.isfinite(fresh).all()
    assert torch.equal(fresh, expected)
