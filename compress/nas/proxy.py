"""TraceNAS proxy Φ: how well a candidate's sub-block gradients still align with the dense model's.

Base traces (ALGORITHMS.md §2): for each layer l and sub-block m ∈ {attn, mlp},
g_base(l, m) = ∂L/∂W over the weights of m's linears (q, k, v, o or gate, up, down), with L the LM loss of the
dense model summed over the proxy batches (mean token cross-entropy per batch). A candidate's gradients ḡ(l, m) are
computed the same way on the pruned model and compared on the coordinates the candidate kept (its rows/columns
are a subset of the dense ones):

    Φ = Σ_{(l, m) active} ρ(ḡ(l, m), g_base(l, m)[kept]),   Φ_norm = Φ / #active,   ρ = Pearson.

Memory choice: full sub-block gradients (not the paper's rank-64 LoRA adapters, not a random projection). The
base traces take 4 bytes per prunable weight (SmolLM2-135M: 85 M weights → 340 MB) and a candidate's backward
holds its own gradients once more; activations are bounded by ``batch_size`` sequences. Exact, and the slicing
onto kept coordinates needs no approximation — a projection would mix kept and removed coordinates. For models
whose prunable weights do not fit twice in memory, this proxy is not the right tool (stated, not hidden).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compress.adapters import (
    SUB_BLOCKS,
    Arch,
    AttentionLayout,
    attention_layout,
    decoder_layers,
    is_skipped,
    linear_at,
    model_config,
)
from compress.nas.rank import pearson
from compress.prune.surgery import head_channels

SubBlock = tuple[int, str]  # (layer index, "attn" | "mlp")


def sub_block_paths(arch: Arch, name: str) -> tuple[str, ...]:
    return arch.attn_linears if name == "attn" else arch.mlp_linears


@contextmanager
def _only_sub_block_weights(model: nn.Module, arch: Arch) -> Iterator[dict[SubBlock, dict[str, Tensor]]]:
    """Make the weights of every present sub-block's linears the only parameters that require gradients."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params: dict[SubBlock, dict[str, Tensor]] = {}
    for index, layer in enumerate(decoder_layers(model, arch)):
        for name in SUB_BLOCKS:
            if is_skipped(layer, arch, name):
                continue
            weights = {path: linear_at(layer, path).weight for path in sub_block_paths(arch, name)}
            for w in weights.values():
                w.requires_grad_(True)
                w.grad = None
            params[(index, name)] = weights
    try:
        yield params
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def sub_block_gradients(
    model: nn.Module, arch: Arch, input_ids: Tensor, batch_size: int = 4
) -> tuple[dict[SubBlock, dict[str, Tensor]], float]:
    """∂L/∂W of every linear of every present sub-block; input_ids [n, T]; L = Σ over batches of the mean token
    cross-entropy. Returns ({(layer, name): {path: gradient shaped like the weight}}, mean loss per batch)."""
    device = next(model.parameters()).device
    losses = []
    with _only_sub_block_weights(model, arch) as params, torch.enable_grad():
        for chunk in input_ids.split(batch_size):
            chunk = chunk.to(device)
            out = model(input_ids=chunk, labels=chunk, use_cache=False)
            out.loss.backward()
            losses.append(float(out.loss.detach()))
        grads = {}
        for key, weights in params.items():
            grads[key] = {path: w.grad.detach().clone() for path, w in weights.items() if w.grad is not None}
    return grads, sum(losses) / len(losses)


def kept_base(base: dict[str, Tensor], arch: Arch, name: str, layout: AttentionLayout, keep: Tensor) -> list[Tensor]:
    """The dense gradients of one sub-block restricted to the kept units, in :func:`sub_block_paths` order.

    attention: keep [n_kv] bool → q rows / k, v rows / o columns of the kept heads; MLP: keep [F] bool → gate and
    up rows, down columns."""
    if name == "attn":
        q_rows = head_channels(keep, layout.group, layout.head_dim)
        kv_rows = head_channels(keep, 1, layout.head_dim)
        return [base[arch.q][q_rows], base[arch.k][kv_rows], base[arch.v][kv_rows], base[arch.o][:, q_rows]]
    return [base[arch.gate][keep], base[arch.up][keep], base[arch.down][:, keep]]


@dataclass
class ProxyScore:
    phi: float  # Σ ρ over active sub-blocks
    phi_norm: float  # Φ / number of active sub-blocks
    grad_norm: float  # ‖ḡ‖₂ over all active sub-block weights (a baseline)
    loss: float  # the candidate's LM loss on the proxy tokens, a by-product (a baseline: a tiny perplexity)
    per_block: dict[SubBlock, float]


class TraceProxy:
    """Base traces of a dense model, and Φ of candidates derived from it by pruning with known keep-masks."""

    def __init__(self, model: nn.Module, arch: Arch, input_ids: Tensor, batch_size: int = 4) -> None:
        self.arch = arch
        self.input_ids = input_ids
        self.batch_size = batch_size
        config = model_config(model)
        self.layouts = [attention_layout(config, layer, arch) for layer in decoder_layers(model, arch)]
        self.base, self.base_loss = sub_block_gradients(model, arch, input_ids, batch_size)

    @property
    def base_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for block in self.base.values() for g in block.values())

    def score(self, candidate: nn.Module, attn_keep: list[Tensor], mlp_keep: list[Tensor]) -> ProxyScore:
        """Φ of ``candidate`` (the dense model pruned with these keep-masks: [n_kv] and [F] bool per layer)."""
        grads, loss = sub_block_gradients(candidate, self.arch, self.input_ids, self.batch_size)
        per_block: dict[SubBlock, float] = {}
        sq = 0.0
        for (index, name), g in grads.items():
            keep = attn_keep[index] if name == "attn" else mlp_keep[index]
            base = kept_base(self.base[(index, name)], self.arch, name, self.layouts[index], keep)
            cand = [g[path] for path in sub_block_paths(self.arch, name)]
            per_block[(index, name)] = pearson(
                torch.cat([c.reshape(-1) for c in cand]), torch.cat([b.reshape(-1) for b in base])
            )
            sq += sum(float((c.double() ** 2).sum()) for c in cand)
        phi = sum(per_block.values())
        return ProxyScore(phi, phi / max(1, len(per_block)), math.sqrt(sq), loss, per_block)
