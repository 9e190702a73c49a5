"""Dequantized exports keep the model's dtype: ``export: dequantized`` and ``secateurs export DIR --to hf``."""

import pytest
import torch
from safetensors import safe_open

from compress.adapters import arch_for
from compress.checkpoint import write_checkpoint
from compress.cli import main
from compress.quantize import dequantize_model, quant_linears, quantize_model
from compress.recipe import QuantizeConfig
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _packed(dtype: torch.dtype) -> torch.nn.Module:
    model = build_tiny("llama").to(dtype)
    quantize_model(model, arch_for(model.config), QuantizeConfig(dtypes="bitmod4", group_size=16), None)
    return model


def _tensor(folder, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_model_keeps_the_model_dtype(dtype):
    model = _packed(dtype)
    expected = model.get_submodule(Q).dequantized_weight(torch.float32).to(dtype)
    dequantize_model(model)
    assert not quant_linears(model)
    weight = model.get_submodule(Q).weight
    assert weight.dtype == dtype and torch.equal(weight, expected)


def test_export_dequantized_and_to_hf_write_the_model_dtype(tokenizer, tmp_path):
    model = _packed(torch.bfloat16)
    expected = model.get_submodule(Q).dequantized_weight(torch.float32).to(torch.bfloat16)
    arch = arch_for(model.config)
    direct = write_checkpoint(model, tokenizer, arch, tmp_path / "direct", {}, export="dequantized")
    assert _tensor(direct, f"{Q}.weight").dtype == torch.bfloat16
    packed = write_checkpoint(model, tokenizer, arch, tmp_path / "packed", {})
    assert _tensor(packed, f"{Q}.weight").dtype == torch.int32  # bit planes
    assert main(["export", str(packed), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    weight = _tensor(tmp_path / "hf", f"{Q}.weight")
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected)
    assert main(["export", str(packed), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2  # exists, no --overwrite
