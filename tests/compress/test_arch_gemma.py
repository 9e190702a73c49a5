"""Gemma's norm conventions where an algorithm touches a norm: AWQ scales fold into (1 + w), not w; a removed
sub-block's constant (its mean output) replaces it before the post-norm, which stays."""

import pytest
import torch
from torch import nn

import compress
from compress.adapters import arch_for, decoder_layers, linear_at
from compress.prune.pruner import prune_model
from compress.quantize import fold_scales
from compress.recipe import PruneConfig
from compress.remote.modeling_secateurs import SkippedSubBlock
from tests.compress.tiny_archs import build_arch, token_ids
from tests.tiny_tokenizer import build_tiny_tokenizer


def _layer_output(layer, x, kwargs):
    with torch.no_grad():
        out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_awq_scales_fold_into_the_one_plus_w_norm(family):
    model = build_arch(family)
    arch = arch_for(model.config)
    layer = decoder_layers(model, arch)[0]
    x = torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).unsqueeze(0)
    rotary = model.get_submodule(arch.rotary)
    cos_sin = rotary(x, pos) if family == "gemma2" else rotary(x, pos, "sliding_attention")
    kwargs = {"position_embeddings": cos_sin, "attention_mask": None, "position_ids": pos}
    before = _layer_output(layer, x, kwargs)
    s = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) + 0.5
    for norm_path, consumers in arch.scale_producers:
        if "." not in norm_path:  # the pre-norms: (1 + w) scales
            fold_scales(layer.get_submodule(norm_path), [linear_at(layer, p) for p in consumers], s, arch.norm_offset)
    after = _layer_output(layer, x, kwargs)
    assert float((after - before).abs().max()) <= 1e-4
    # the Llama convention (w ÷ s) would change the function: the offset is what makes the fold exact
    other = build_arch(family)
    other_layer = decoder_layers(other, arch)[0]
    norm_path, consumers = arch.scale_producers[0]
    fold_scales(other_layer.get_submodule(norm_path), [linear_at(other_layer, p) for p in consumers], s, 0.0)
    assert float((_layer_output(other_layer, x, kwargs) - before).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_awq_quantization_keeps_the_logits_close(family, tmp_path):
    model = build_arch(family)
    ids = token_ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    tokenizer = build_tiny_tokenizer(tmp_path)
    calibration = token_ids(8, 32, seed=3)
    compress.quantize(model, tokenizer, {"dtypes": "int8_sym", "group_size": 16, "method": "awq"},
                      calibration=calibration, batch_size=4)  # fmt: skip
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
    sqnr = 10 * torch.log10(dense.pow(2).mean() / (dense - quantized).pow(2).mean())
    assert sqnr > 25  # 8-bit weights after an exact fold: the logits barely move


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_removed_mlp_adds_its_mean_output_before_the_post_norm(family):
    model = build_arch(family)
    arch = arch_for(model.config)
    layer = decoder_layers(model, arch)[1]
    down = linear_at(layer, arch.down)
    seen = []
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    calibration = token_ids(8, 32, seed=3)
    with torch.no_grad():
        model(input_ids=calibration)  # a plain forward: the independent mean input of layer 1's down_proj
    hook.remove()
    expected = (torch.cat(seen).double() @ down.weight.double().T).mean(0)
    prune_model(model, arch, PruneConfig(attn_groups=[3, 3, 3], mlp_channels=[96, 0, 96]), calibration, batch_size=4)
    block = layer.get_submodule(arch.mlp)
    assert isinstance(block, SkippedSubBlock)
    assert torch.allclose(block.bias.double(), expected, atol=1e-4)
    assert isinstance(layer.get_submodule(arch.mlp_norm), nn.Identity)  # the pre-norm goes with the block
    assert arch.mlp_post_norm is not None
    post = layer.get_submodule(arch.mlp_post_norm)
    assert not isinstance(post, nn.Identity)  # the constant still passes through the post-norm
    x = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(post(block(x)), post(block.bias.expand_as(x)))
