"""The adapter table against the real transformers classes: every path it names exists, every decoder linear is
one it names, and its norm convention (``norm_offset``) is what the modeling code computes."""

import pytest
import torch
from torch import nn

from compress.adapters import ARCHS, arch_for, attention_layout, decoder_layers, linear_at
from tests.compress.tiny_archs import FAMILIES as NEW_FAMILIES
from tests.compress.tiny_archs import build_arch
from tests.conftest import FAMILIES, build_tiny


def _build(family: str) -> nn.Module:
    return build_arch(family) if family in NEW_FAMILIES else build_tiny(family)


ALL = sorted(FAMILIES) + sorted(NEW_FAMILIES)


def test_every_table_entry_has_a_tiny_model():
    built = {f"{model_class.__name__}" for _, model_class in FAMILIES.values()}
    built |= {model_class.__name__ for _, model_class, _ in NEW_FAMILIES.values()}
    assert built == set(ARCHS)


@pytest.mark.parametrize("family", ALL)
def test_paths_exist_and_cover_every_linear(family):
    model = _build(family)
    arch = arch_for(model.config)
    layer = decoder_layers(model, arch)[0]
    for path in arch.linears:
        linear_at(layer, path)
    for path in (arch.attn_norm, arch.mlp_norm, arch.attn_post_norm, arch.mlp_post_norm, *arch.per_head_dim_modules):
        if path is not None:
            layer.get_submodule(path)
    found = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert found == set(arch.linears)  # no decoder linear is unknown to pruning and quantization
    for path in (arch.embed, arch.final_norm, arch.lm_head, arch.rotary):
        model.get_submodule(path)
    layout = attention_layout(model.config, layer, arch)
    assert (layout.n_q, layout.n_kv) == (model.config.num_attention_heads, model.config.num_key_value_heads)


@pytest.mark.parametrize("family", ALL)
def test_norm_offset_is_the_modeling_codes_convention(family):
    """With weight w = 0 a norm computes offset · x / rms(x): the offset AWQ folding must respect."""
    model = _build(family)
    arch = arch_for(model.config)
    norm = decoder_layers(model, arch)[0].get_submodule(arch.mlp_norm)
    with torch.no_grad():
        norm.weight.zero_()
        x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        unit = x * x.pow(2).mean(-1, keepdim=True).rsqrt()  # eps (≤ 1e-5) is far below atol
        assert torch.allclose(norm(x), arch.norm_offset * unit, atol=1e-4)


def test_fused_layout_is_described():
    phi3 = ARCHS["Phi3ForCausalLM"]
    assert phi3.fused and phi3.attn_linears == ("self_attn.qkv_proj", "self_attn.o_proj")
    assert phi3.mlp_linears == ("mlp.gate_up_proj", "mlp.down_proj")
    assert phi3.input_groups == [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                 ("mlp.down_proj",)]  # fmt: skip
    assert [p for p, _ in phi3.scale_producers] == ["input_layernorm", "post_attention_layernorm"]
    llama = ARCHS["LlamaForCausalLM"]
    assert [p for p, _ in llama.scale_producers] == [
        "input_layernorm",
        "self_attn.v_proj",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]
