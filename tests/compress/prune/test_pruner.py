import pytest
import torch

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.prune.pruner import collect_statistics, count_parameters, prunable_parameters, prune_model
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
    summary = prune_model(model, arch, PruneConfig(method=method, ratio=0.3, statistics=statistics), _ids(), 4)
    hidden, d_h, g = 48, 8, 2
    expected = sum(
        k * hidden * d_h * (2 * g + 2) + f * 3 * hidden
        for k, f in zip(summary["kv_groups"], summary["intermediate_sizes"], strict=True)
    )
    biases = sum(
        sum(layer.get_submodule(p).bias.numel() for p in (arch.o, arch.down) if layer.get_submodule(p).bias is not None)
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


def test_magnitude_sp_compensation_is_applied_with_the_calibration_means():
    """magnitude-sp keeps its weight-only scores; with bias_compensation it collects statistics for the means
    and gives down_proj b = W[:, P]·x̄[P], exactly as for FLAP (it used to record compensation and apply none)."""
    ids = _ids()
    plain, compensated = build_tiny("llama"), build_tiny("llama")
    arch = arch_for(plain.config)
    stats = collect_statistics(compensated, arch, ids, 4)
    cfg = PruneConfig(method="magnitude-sp", ratio=0.4, structure="UL-UM", bias_compensation=True)
    prune_model(plain, arch, cfg.model_copy(update={"bias_compensation": False}), ids, 4)
    summary = prune_model(compensated, arch, cfg, ids, 4)
    assert summary["intermediate_sizes"][0] < 96
    assert decoder_layers(plain, arch)[0].get_submodule(arch.down).bias is None
    dense = build_tiny("llama")
    down_dense = decoder_layers(dense, arch)[0].get_submodule(arch.down)
    down = decoder_layers(compensated, arch)[0].get_submodule(arch.down)
    kept = torch.zeros(96, dtype=torch.bool)
    columns = [
        j
        for j in range(96)
        if any(torch.equal(down_dense.weight[:, j], down.weight[:, i]) for i in range(down.in_features))
    ]
    kept[columns] = True
    expected = down_dense.weight.double()[:, ~kept] @ stats[0]["down"].mean[~kept]
    torch.testing.assert_close(down.bias.double(), expected, atol=1e-6, rtol=1e-5)


def test_magnitude_sp_compensation_needs_calibration_data():
    model = build_tiny("llama")
    cfg = PruneConfig(method="magnitude-sp", ratio=0.4, bias_compensation=True)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_model(model, arch_for(model.config), cfg, None, 4)
    prune_model(model, arch_for(model.config), cfg.model_copy(update={"bias_compensation": False}), None, 4)
