"""Φ: the dense model scores ρ = 1 on every sub-block; the kept-coordinate alignment is checked against an
independent reference (the same pruning done by zeroing, whose gradients at kept coordinates must be identical)."""

import random

import pytest
import torch

from compress.adapters import arch_for, decoder_layers
from compress.candidates import DenseCache
from compress.nas.proxy import TraceProxy, sub_block_gradients
from compress.nas.space import random_candidate
from compress.prune.surgery import head_channels
from tests.conftest import build_tiny

CAL = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(3))
PROXY = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(4))


def test_dense_model_scores_one_per_sub_block():
    model = build_tiny("llama", num_hidden_layers=3)
    arch = arch_for(model.config)
    proxy = TraceProxy(model, arch, PROXY, batch_size=2)
    full = [torch.ones(3, dtype=torch.bool)] * 3
    score = proxy.score(model, full, [torch.ones(96, dtype=torch.bool)] * 3)
    assert score.phi == pytest.approx(6.0) and score.phi_norm == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    assert proxy.base_bytes == 4 * sum(
        m.weight.numel()
        for layer in decoder_layers(model, arch)
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    )


def _zeroed(model, arch, attn_keep, mlp_keep):
    """Removal by zeroing: o_proj columns of removed heads, down_proj columns of removed channels (no bias)."""
    model = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for layer, a, m in zip(decoder_layers(model, arch), attn_keep, mlp_keep, strict=True):
            cols = head_channels(a, 2, 8)
            layer.self_attn.o_proj.weight[:, ~cols] = 0
            layer.mlp.down_proj.weight[:, ~m] = 0
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kept_coordinates_align_with_a_zeroing_reference(family):
    model = build_tiny(family, num_hidden_layers=4)
    arch = arch_for(model.config)
    engine = DenseCache(model, arch, CAL, batch_size=4).nas(mlp_step=16, skip_from=2, compensation=False)
    lo, hi = engine.spec.window(0.6, 0.06)
    cand = random_candidate(engine.spec, random.Random(2), 0.6, lo, hi, p_skip=0.0)
    assert any(k < 3 for k in cand.attn) and any(c < 96 for c in cand.mlp)
    pruned, attn, mlp = engine.realize(cand)
    # the zeroed dense model computes the same function as the pruned one ...
    reference = _zeroed(model, arch, attn, mlp)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(input_ids=PROXY).logits, reference(input_ids=PROXY).logits, atol=1e-5, rtol=1e-5
        )
    # ... so with the zeroed model as "base", every kept-coordinate gradient correlates perfectly
    proxy = TraceProxy(reference, arch, PROXY, batch_size=2)
    score = proxy.score(pruned, attn, mlp)
    assert all(rho == pytest.approx(1.0, abs=1e-6) for rho in score.per_block.values()), score.per_block
    # and against the real dense model, removal lowers Φ below the number of active sub-blocks
    dense_proxy = TraceProxy(model, arch, PROXY, batch_size=2)
    assert dense_proxy.score(pruned, attn, mlp).phi < cand.n_active


def test_skipped_sub_blocks_have_no_gradients_and_no_terms():
    model = build_tiny("llama", num_hidden_layers=4)
    arch = arch_for(model.config)
    engine = DenseCache(model, arch, CAL, batch_size=4, proxy_tokens=lambda: PROXY).nas(mlp_step=16, skip_from=2)
    cand = engine.uniform_candidate(0.7, 0.05)
    skipped = type(cand)(cand.attn[:3] + (0,), cand.mlp[:2] + (0, cand.mlp[3]))
    pruned, attn, mlp = engine.realize(skipped)
    grads, loss = sub_block_gradients(pruned, arch, PROXY)
    assert (3, "attn") not in grads and (2, "mlp") not in grads and len(grads) == 6 and loss > 0
    row = engine.measure(skipped)
    assert row["active_sub_blocks"] == 6 and row["phi"] == pytest.approx(row["phi_norm"] * 6)
