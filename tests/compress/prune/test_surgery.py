import torch
from torch import nn

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.prune.surgery import compensation_bias, remove_kv_groups, remove_mlp_channels
from tests.conftest import build_tiny


def test_compensation_bias_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean = torch.tensor([10.0, 20.0, 30.0])
    keep = torch.tensor([True, False, False])
    b = compensation_bias(w, mean, keep, torch.tensor([1.0, -1.0]))
    assert torch.equal(b, torch.tensor([1 + 2 * 20 + 3 * 30, -1 + 5 * 20 + 6 * 30], dtype=torch.float64))


def test_bias_compensation_is_exact_for_constant_removed_inputs():
    torch.manual_seed(0)
    down = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True])
    x[:, ~keep] = torch.tensor([0.7, -1.3], dtype=torch.float64)  # removed channels carry a constant
    reference = down(x)
    bias = compensation_bias(down.weight, x.mean(0), keep, None)
    pruned = x[:, keep] @ down.weight[:, keep].T + bias
    assert torch.allclose(pruned, reference, atol=1e-12)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_removing_nothing_leaves_logits_unchanged(tiny_model, token_batch):
    arch = arch_for(tiny_model.config)
    before = _logits(tiny_model, token_batch)
    for layer in decoder_layers(tiny_model, arch):
        layout = attention_layout(tiny_model.config, layer, arch)
        remove_kv_groups(layer, arch, layout, torch.ones(layout.n_kv, dtype=torch.bool), torch.zeros(48))
        remove_mlp_channels(layer, arch, torch.ones(96, dtype=torch.bool), torch.zeros(96))
    assert torch.equal(before, _logits(tiny_model, token_batch))


def test_group_removal_equals_zeroing_its_heads(tiny_model, token_batch):
    """Removing KV group 1 (its k/v head, its g query heads, their o_proj columns) must equal a model whose
    o_proj columns of those query heads are zero (their attention output then contributes nothing)."""
    arch = arch_for(tiny_model.config)
    reference = build_tiny(_family(tiny_model))
    layer0_ref = decoder_layers(reference, arch)[0]
    layout = attention_layout(reference.config, layer0_ref, arch)
    width = layout.group * layout.head_dim
    with torch.no_grad():
        layer0_ref.get_submodule(arch.o).weight[:, width : 2 * width] = 0
    layer0 = decoder_layers(tiny_model, arch)[0]
    remove_kv_groups(layer0, arch, layout, torch.tensor([True, False, True]))
    assert layer0.get_submodule(arch.q).out_features == 2 * width
    assert layer0.get_submodule(arch.k).out_features == 2 * layout.head_dim
    assert layer0.get_submodule(arch.o).in_features == 2 * width
    assert torch.allclose(_logits(tiny_model, token_batch), _logits(reference, token_batch), atol=1e-5)


def test_mlp_channel_removal_equals_zeroing_down_columns(tiny_model, token_batch):
    arch = arch_for(tiny_model.config)
    reference = build_tiny(_family(tiny_model))
    keep = torch.ones(96, dtype=torch.bool)
    keep[::3] = False
    with torch.no_grad():
        decoder_layers(reference, arch)[1].get_submodule(arch.down).weight[:, ~keep] = 0
    remove_mlp_channels(decoder_layers(tiny_model, arch)[1], arch, keep)
    assert torch.allclose(_logits(tiny_model, token_batch), _logits(reference, token_batch), atol=1e-5)


def _family(model) -> str:
    return {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "mistral",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
    }[model.config.architectures[0]]
