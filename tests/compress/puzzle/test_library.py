"""Library variants: grid, and exact parameter / KV costs of the realised sub-blocks on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.prune.pruner import collect_statistics, count_parameters, module_units
from compress.puzzle.library import Variant, block_shape, library, realize_sub_block, variant_kv_bytes, variant_params
from compress.recipe import PruneConfig
from tests.conftest import build_tiny


def test_grid_and_layer0_attention_is_never_a_noop():
    model = build_tiny("llama", num_hidden_layers=3)
    shape = block_shape(model, arch_for(model.config))
    groups = library(shape, 3, mlp_steps=4)
    assert [v.label for v in groups[0]] == ["attn:3", "attn:2", "attn:1"]
    assert [v.label for v in groups[1]] == ["mlp:96", "mlp:72", "mlp:48", "mlp:24", "mlp:noop"]
    assert groups[2][-1] == Variant("attn", 0)
    assert all(vs[0].units in (shape.n_kv, shape.intermediate) for vs in groups)  # parent first


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_parameter_costs_are_those_of_the_realised_model(family):
    model = build_tiny(family, num_hidden_layers=2)
    arch = arch_for(model.config)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, arch, ids, 2)
    units = module_units(model, arch, PruneConfig(method="flap"), stats)
    shape = block_shape(model, arch)
    dense = count_parameters(model)
    for vs in library(shape, 2, mlp_steps=4, allow_linear=True)[2:]:  # layer 1: attention no-op and linear
        for v in vs:
            pruned = copy.deepcopy(model)
            layer = decoder_layers(pruned, arch)[1]
            realize_sub_block(layer, arch, attention_layout(pruned.config, layer, arch), stats[1], units[1], v)
            delta = count_parameters(pruned) - dense
            assert delta == variant_params(shape, v) - variant_params(shape, vs[0]), v.label


def test_linear_variants_and_their_labels():
    model = build_tiny("llama", num_hidden_layers=2)
    shape = block_shape(model, arch_for(model.config))
    groups = library(shape, 2, mlp_steps=2, allow_linear=True)
    assert [v.label for v in groups[0]] == ["attn:3", "attn:2", "attn:1"]  # layer 0's attention: never linear
    assert [v.label for v in groups[2]][-1] == "attn:linear" and groups[1][-1] == Variant("mlp", 0, True)
    assert all(Variant.parse(v.label) == v for vs in groups for v in vs)
    assert variant_params(shape, Variant("mlp", 0, True)) == 48 * 48 + 48 + 48


def test_kv_bytes():
    model = build_tiny("llama")
    shape = block_shape(model, arch_for(model.config))
    assert variant_kv_bytes(shape, Variant("attn", 2), 2) == 2 * 2 * 8 * 2
    assert variant_kv_bytes(shape, Variant("attn", 0)) == 0 and variant_kv_bytes(shape, Variant("mlp", 96)) == 0
