"""Blockwise local distillation and global KD on tiny models (compress.recover.distill)."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.adapters import arch_for
from compress.calibration import LayerInputs
from compress.prune.pruner import prune_model
from compress.recipe import PruneConfig
from compress.recover.distill import (
    TrainSettings,
    distill_blocks,
    distill_global,
    kd_loss,
    normalized_mse,
    train_block,
)
from compress.remote.modeling_secateurs import skip_sub_block
from tests.conftest import build_tiny


def _ids(n: int = 8, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 512, (n, 24), generator=torch.Generator().manual_seed(seed))


def _pruned():
    dense = build_tiny("llama")
    student = copy.deepcopy(dense)
    prune_model(student, arch_for(dense.config), PruneConfig(ratio=0.5, structure="UL-UM"), _ids(seed=1), 4)
    return dense, student


@pytest.mark.parametrize("train", ["all", "consumers", "lora"])
def test_bld_lowers_block_loss_and_is_bit_reproducible(train) -> None:
    dense, student = _pruned()
    again = copy.deepcopy(student)
    settings = TrainSettings(steps=12, lr=1e-3, train=train, lora_rank=4)
    arch = arch_for(dense.config)
    records = distill_blocks(dense, student, arch, _ids(), settings, seed=3, batch_size=2)
    assert len(records) == 2
    assert all(r["loss_after"] < r["loss_before"] for r in records)
    distill_blocks(dense, again, arch, _ids(), settings, seed=3, batch_size=2)
    for (name, p), (_, q) in zip(student.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_bld_seed_matters_and_compressed_inputs_option() -> None:
    dense, student = _pruned()
    other = copy.deepcopy(student)
    arch = arch_for(dense.config)
    settings = TrainSettings(steps=6, lr=1e-3)
    distill_blocks(dense, student, arch, _ids(), settings, seed=3, batch_size=2)
    records = distill_blocks(dense, other, arch, _ids(), settings, seed=4, batch_size=2, inputs="compressed")
    assert records[1]["loss_after"] < records[1]["loss_before"]
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), other.parameters(), strict=True))


def test_losses_against_references() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    assert normalized_mse(s, t) == pytest.approx(float(((s - t) ** 2).sum() / (t**2).sum()))
    p_t, p_s = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    reference = 4 * float((p_t * (p_t.log() - p_s.log())).sum(-1).mean())
    assert float(kd_loss(s, t, temperature=2.0)) == pytest.approx(reference, rel=1e-5)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_global_kd_lowers_the_kl() -> None:
    dense, student = _pruned()
    arch = arch_for(dense.config)
    ids = _ids()
    with torch.no_grad():
        before = float(kd_loss(student(input_ids=ids).logits, dense(input_ids=ids).logits))
    losses = distill_global(dense, student, arch, ids, TrainSettings(steps=15, lr=3e-3), seed=0, batch_size=8)
    with torch.no_grad():
        after = float(kd_loss(student(input_ids=ids).logits, dense(input_ids=ids).logits))
    assert len(losses) == 15 and after < before


def test_layer_without_linears_is_left_unchanged() -> None:
    """A layer whose attention and MLP were both removed has nothing to train: BLD keeps it and its loss."""
    dense = build_tiny("llama")
    arch = arch_for(dense.config)
    layer = dense.model.layers[1]
    hidden = int(dense.config.hidden_size)
    for name, norm, attention in (("self_attn", "input_layernorm", True), ("mlp", "post_attention_layernorm", False)):
        skip_sub_block(layer, name, norm, hidden, attention)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(3))
    position = torch.arange(5).unsqueeze(0)
    emb = dense.model.rotary_emb(x, position)
    inputs = LayerInputs([x], [{"position_embeddings": emb, "attention_mask": None}])
    before, after = train_block(layer, arch, inputs, [x + 1.0], TrainSettings(steps=3, lr=1e-2), seed=0)
    assert before == after > 0
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
