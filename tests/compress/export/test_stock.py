"""Stock configs: uniform pruned checkpoints load with plain ``from_pretrained`` (no remote code) and equal logits;
biases no config field covers, per-layer shapes and skipped blocks keep the remote-code config."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.checkpoint import REMOTE_FILE, write_checkpoint
from compress.prune.pruner import prune_model
from compress.prune.surgery import remove_kv_groups, skip_block
from compress.recipe import PruneConfig
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

CAL = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _pruned(family: str, structure: str) -> torch.nn.Module:
    model = build_tiny(family)
    prune_model(model, arch_for(model.config), PruneConfig(ratio=0.4, structure=structure), CAL, batch_size=4)
    return model


def _write(model, tokenizer, folder):
    out = write_checkpoint(model, tokenizer, arch_for(model.config), folder, {"recipe": {}})
    return out, json.loads((out / "config.json").read_text()), json.loads((out / "secateurs.json").read_text())


def test_uniform_flap_checkpoint_loads_without_remote_code(tokenizer, tmp_path, token_batch):
    model = _pruned("llama", "UL-UM")  # FLAP's uniform structure, with o_proj/down_proj compensation biases
    layer = decoder_layers(model, arch_for(model.config))[0]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
    out, config, record = _write(model, tokenizer, tmp_path / "ckpt")
    assert "auto_map" not in config and not (out / REMOTE_FILE).exists()
    assert config["attention_bias"] and config["mlp_bias"]
    assert config["num_key_value_heads"] < 3 or config["intermediate_size"] < 96
    assert record["remote_code"]["needed"] is False
    plain = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False, dtype=torch.float32).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not plain.model.layers[0].self_attn.q_proj.bias.any()  # the added zero biases
    with torch.no_grad():
        diff = (plain(input_ids=token_batch).logits - model(input_ids=token_batch).logits).abs().max()
    assert float(diff) <= 1e-6


def test_plain_model_gets_a_stock_config(tokenizer, tmp_path):
    _, config, record = _write(build_tiny("qwen2"), tokenizer, tmp_path / "ckpt")
    assert "auto_map" not in config and record["remote_code"]["needed"] is False


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_biases_without_a_config_field_keep_remote_code(family, tokenizer, tmp_path):
    _, config, record = _write(_pruned(family, "UL-UM"), tokenizer, tmp_path / "ckpt")
    assert "auto_map" in config
    assert "o_proj" in record["remote_code"]["reason"]


def test_qwen3_takes_the_o_proj_bias_but_not_the_down_proj_bias(tokenizer, tmp_path):
    _, config, record = _write(_pruned("qwen3", "UL-UM"), tokenizer, tmp_path / "ckpt")
    assert "auto_map" in config and "down_proj" in record["remote_code"]["reason"]
    assert "o_proj" not in record["remote_code"]["reason"]


def test_per_layer_shapes_and_skipped_blocks_keep_remote_code(tokenizer, tmp_path):
    model = build_tiny("llama")
    arch = arch_for(model.config)
    skip_block(decoder_layers(model, arch)[1], arch, "mlp")
    out, config, record = _write(model, tokenizer, tmp_path / "skipped")
    assert "auto_map" in config and (out / REMOTE_FILE).exists() and "skipped" in record["remote_code"]["reason"]
    model = build_tiny("llama")
    layer = decoder_layers(model, arch)[1]
    remove_kv_groups(layer, arch, attention_layout(model.config, layer, arch), torch.tensor([True, False, True]))
    out, config, record = _write(model, tokenizer, tmp_path / "per-layer")
    assert "auto_map" in config and "different shapes" in record["remote_code"]["reason"]
