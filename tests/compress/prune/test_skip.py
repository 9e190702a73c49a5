"""Removed sub-blocks (depth pruning): surgery, explicit per-layer widths, checkpoints that round-trip through a
fresh process with plain transformers + remote code, and generation with a KV cache."""

import subprocess
import sys

import pytest
import torch

from compress.adapters import arch_for, decoder_layers, is_skipped
from compress.checkpoint import load_checkpoint_model, write_checkpoint
from compress.prune.pruner import (
    collect_statistics,
    count_parameters,
    explicit_widths,
    prunable_parameters,
    prune_model,
)
from compress.prune.surgery import skip_block
from compress.recipe import PruneConfig
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

CAL = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_explicit_widths_snap_to_groups_and_steps():
    cfg = PruneConfig(attn_keep=[1.0, 0.5, 0.0, 0.1], mlp_keep=[1.0, 0.5, 0.0, 0.01])
    groups, channels = explicit_widths(cfg, [3, 3, 3, 3], [96] * 4)
    assert groups == [3, 2, 0, 1]  # round(1.5) = 2 (banker's rounding), a positive fraction keeps ≥ 1 group
    assert channels == [96, 32, 0, 32]  # 48 is halfway between 32 and 64: ties go to the narrower width


def test_explicit_counts_are_used_as_given():
    cfg = PruneConfig(attn_groups=[3, 1, 0, 2], mlp_channels=[96, 40, 0, 7])
    assert explicit_widths(cfg, [3] * 4, [96] * 4) == ([3, 1, 0, 2], [96, 40, 0, 7])
    with pytest.raises(InputError, match="prune.mlp_channels.1: 100 but the layer has 96"):
        explicit_widths(PruneConfig(attn_groups=[3, 3], mlp_channels=[96, 100]), [3, 3], [96, 96])


def test_widths_as_fractions_or_counts_not_both():
    with pytest.raises(ValueError, match="not both"):
        PruneConfig(attn_keep=[1.0], mlp_keep=[1.0], attn_groups=[3], mlp_channels=[96])
    with pytest.raises(ValueError, match="attn_groups and mlp_channels must be given together"):
        PruneConfig(attn_groups=[3])


def test_skipped_mlp_with_mean_is_exact_for_constant_inputs():
    model = build_tiny("llama", num_hidden_layers=2)
    arch = arch_for(model.config)
    layer = decoder_layers(model, arch)[0]
    x = torch.randn(1, 1, 48).expand(2, 5, 48).contiguous()  # the same token vector everywhere
    with torch.no_grad():
        expected = layer.mlp(x)
        down_input = torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    mean = down_input[0, 0].double()
    skip_block(layer, arch, "mlp", mean)
    assert is_skipped(layer, arch, "mlp")
    with torch.no_grad():
        got = layer.mlp(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _depth_pruned(family: str) -> torch.nn.Module:
    model = build_tiny(family, num_hidden_layers=4)
    cfg = PruneConfig(attn_keep=[1.0, 0.34, 0.0, 1.0], mlp_keep=[0.5, 0.0, 1.0, 0.0], mlp_step=16)
    prune_model(model, arch_for(model.config), cfg, CAL, batch_size=4)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_explicit_widths_and_skips_are_applied(family):
    model = _depth_pruned(family)
    arch = arch_for(model.config)
    layers = decoder_layers(model, arch)
    assert [is_skipped(layer, arch, "attn") for layer in layers] == [False, False, True, False]
    assert [is_skipped(layer, arch, "mlp") for layer in layers] == [False, True, False, True]
    assert layers[1].self_attn.k_proj.out_features == 8  # one KV group of head_dim 8
    assert layers[0].mlp.down_proj.in_features == 48
    dense = build_tiny(family, num_hidden_layers=4)
    per_attn = sum(p.numel() for p in decoder_layers(dense, arch)[0].self_attn.parameters())
    assert prunable_parameters(model, arch) < prunable_parameters(dense, arch) - 2 * per_attn


def test_first_layer_attention_cannot_be_removed():
    model = build_tiny("llama", num_hidden_layers=2)
    with pytest.raises(InputError, match="attn_keep.0"):
        prune_model(model, arch_for(model.config), PruneConfig(attn_keep=[0.0, 1.0], mlp_keep=[1.0, 1.0]), CAL)
    with pytest.raises(InputError, match="attn_groups.0"):
        prune_model(model, arch_for(model.config), PruneConfig(attn_groups=[0, 3], mlp_channels=[96, 96]), CAL)


def test_wrong_number_of_layers_is_an_input_error():
    model = build_tiny("llama", num_hidden_layers=2)
    with pytest.raises(InputError, match="expected 2 entries"):
        prune_model(model, arch_for(model.config), PruneConfig(attn_keep=[1.0], mlp_keep=[1.0]), CAL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_skipped_checkpoint_round_trips_in_a_fresh_process(family, tokenizer, tmp_path, token_batch):
    model = _depth_pruned(family)
    out = write_checkpoint(model, tokenizer, arch_for(model.config), tmp_path / "ckpt", {"recipe": {}})
    reloaded = load_checkpoint_model(out)
    assert count_parameters(reloaded) == count_parameters(model)
    torch.save(token_batch, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=token_batch).logits
        assert float((reloaded(input_ids=token_batch).logits - expected).abs().max()) <= 1e-5
        greedy = model.generate(token_batch[:1, :8], max_new_tokens=6, do_sample=False)
    torch.save(expected, tmp_path / "expected.pt")
    torch.save(greedy, tmp_path / "greedy.pt")
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        f"greedy = torch.load({str(tmp_path / 'greedy.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    logits = m(input_ids=ids).logits\n"
        "    again = m.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)\n"
        "print(float((logits - expected).abs().max()), bool(torch.equal(again, greedy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    diff, same = done.stdout.split()
    assert float(diff) <= 1e-5 and same == "True"


def test_cached_generation_equals_recomputation_with_skipped_attention():
    model = _depth_pruned("llama")
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        full = model(input_ids=out[:, :-1]).logits.argmax(-1)[:, ids.shape[1] - 1 :]
    assert torch.equal(out[:, ids.shape[1] :], full)


def test_statistics_skip_removed_sub_blocks():
    model = _depth_pruned("llama")
    stats = collect_statistics(model, arch_for(model.config), CAL, batch_size=4)
    assert "o" not in stats[2] and "down" not in stats[1] and "down" in stats[0]


def test_info_lists_removed_sub_blocks():
    from compress.info import describe, format_description

    model = _depth_pruned("llama")
    d = describe(model)
    assert [row["kv_heads"] for row in d["layers"]] == [3, 1, 0, 3]
    assert [row["intermediate"] for row in d["layers"]] == [48, 0, 96, 0]
    assert "skipped" in format_description(d)
