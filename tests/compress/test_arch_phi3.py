"""Phi-3's fused projections: per-layer head counts follow the sliced qkv_proj (in memory and after reload);
the steps that need q/k/v as separate modules refuse it with a one-line error."""

import pytest
import torch

import compress
from compress.adapters import arch_for, decoder_layers
from quant.errors import InputError
from tests.compress.tiny_archs import build_arch, token_ids
from tests.tiny_tokenizer import build_tiny_tokenizer


def test_pruned_layers_split_qkv_by_their_own_head_counts(tmp_path):
    model = build_arch("phi3")
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    compress.prune(model, tokenizer, {"attn_groups": [1, 3, 2], "mlp_channels": [96, 48, 16]},
                   calibration=token_ids(8, 32, seed=3), batch_size=4)  # fmt: skip
    arch = arch_for(model.config)
    heads = [(layer.self_attn.config.num_attention_heads, layer.self_attn.num_key_value_heads)
             for layer in decoder_layers(model, arch)]  # fmt: skip
    assert heads == [(2, 1), (6, 3), (4, 2)]
    assert model.config.num_attention_heads == 6  # the model's own config is untouched
    rows = [layer.self_attn.qkv_proj.out_features for layer in decoder_layers(model, arch)]
    assert rows == [(2 + 2 * 1) * 8, (6 + 2 * 3) * 8, (4 + 2 * 2) * 8]
    assert [layer.mlp.gate_up_proj.out_features for layer in decoder_layers(model, arch)] == [192, 96, 32]
    out = compress.save(model, tokenizer, tmp_path / "ckpt")
    from compress.checkpoint import load_checkpoint_model

    reloaded = load_checkpoint_model(out)
    got = [(layer.self_attn.config.num_attention_heads, layer.self_attn.num_key_value_heads)
           for layer in decoder_layers(reloaded, arch)]  # fmt: skip
    assert got == heads
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_nas_is_refused_for_fused_projections(tmp_path):
    model = build_arch("phi3")
    with pytest.raises(InputError, match="fused projections"):
        compress.apply(model, build_tiny_tokenizer(tmp_path), "nas", {"params_ratio": 0.7},
                       calibration=token_ids(4, 16))  # fmt: skip
