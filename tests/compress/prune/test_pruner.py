import pytest
import torch

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.prune.pruner import count_parameters, prunable_parameters, prune_model
from compress.recipe import PruneConfig
from tests.conftest import build_tiny


def _ids():
    return torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "magnitude-sp"])
@pytest.mark.parametrize("statistics", ["dense", "progressive"])
def test_removed_parameters_follow_the_unit_costs(method, statistics):
    model = build_tiny("llama")
    arch = arch_for(model.config)
    before = prunable_parameters(model, arch)
    summary = prune_model(
        model, arch, PruneConfig(method=method, ratio=0.3, statistics=statistics), _ids(), 4
    )
    hidden, d_h, g = 48, 8, 2
    expected = sum(
        k * hidden * d_h * (2 * g + 2) + f * 3 * hidden
        for k, f in zip(summary["kv_groups"], summary["intermediate_sizes"], strict=True)
    )
    biases = sum(
        sum(
            layer.get_submodule(p).bias.numel()
            for p in (arch.o, arch.down)
            if layer.get_submodule(p).bias is not None
        )
        for layer in decoder_layers(model, arch)
    )
    assert prunable_parameters(model, arch) == expected + biases
    assert 0.2 < 1 - expected / before < 0.4
    for layer, k in zip(decoder_layers(model, arch), summary["kv_groups"], strict=True):
        layout = attention_layout(model.config, layer, arch)
        assert layout.n_kv == k >= 1 and layout.group == 2  # GQA stays valid: g query heads per KV head
        assert layer.get_submodule(arch.q).out_features == k * g * d_h


def test_flap_adds_compensation_biases_and_baselines_do_not():
    for method, expect_bias in (("flap", True), ("wanda-sp", False)):
        model = build_tiny("llama")
        arch = arch_for(model.config)
        prune_model(model, arch, PruneConfig(method=method, ratio=0.4, structure="UL-UM"), _ids(), 4)
        down = decoder_layers(model, arch)[0].get_submodule(arch.down)
        assert (down.bias is not None) == expect_bias


def test_ratio_zero_changes_nothing(token_batch):
    model = build_tiny("qwen2")
    reference = build_tiny("qwen2")
    prune_model(model, arch_for(model.config), PruneConfig(ratio=0.0), _ids(), 4)
    assert count_parameters(model) == count_parameters(reference)
    with torch.no_grad():
        assert torch.equal(model(input_ids=token_batch).logits, reference(input_ids=token_batch).logits)


def test_pruning_is_deterministic():
    models = [build_tiny("llama") for _ in range(2)]
    for m in models:
        prune_model(m, arch_for(m.config), PruneConfig(ratio=0.3, statistics="progressive"), _ids(), 4)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
