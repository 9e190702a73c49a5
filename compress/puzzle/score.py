"""Replace-one-block scores (Puzzle §3.2): the parent with only one sub-block swapped for a variant, measured
against the parent's next-token distribution on calibration tokens.

Cost design. The parent's hidden state entering every decoder layer is cached once (one forward pass, memory
n_layers × tokens × hidden); a variant at layer i then runs only layers i..N-1, the final norm and the LM head —
(N − i)/N of a forward pass, half of one on average. Exact scoring therefore costs about
(layers × variants per layer) / 2 forward passes over the scoring tokens. ``estimate="local"`` is the cheaper
option for big libraries: the exact tail pass only for one anchor per sub-block (its smallest variant), and every
other variant scored by its local error at the layer's output, ‖y_v − y‖², scaled by the anchor's
KL / local error (second-order: KL ≈ ½ δᵀFδ grows with the squared perturbation), costing layers × (1 tail pass +
variants × one layer).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compress.adapters import Arch, decoder_layers
from compress.calibration import LayerInputs, _run_layer, capture_layer0_inputs
from compress.puzzle.library import Variant


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over tokens of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v). log_p, log_q: [..., V] log-probs → scalar."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def next_token_loss(log_q: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy. log_q: [n, T, V] log-probs at positions 0..T-1; ids: [n, T] → scalar."""
    return -log_q[:, :-1].gather(-1, ids[:, 1:, None]).mean()


@dataclass
class DenseCache:
    """The parent's inputs to every decoder layer, its outputs, and its next-token log-probs [n, T, V]."""

    inputs: list[LayerInputs]
    outputs: list[list[Tensor]]
    log_probs: Tensor
    ids: Tensor

    @property
    def loss(self) -> float:
        return float(next_token_loss(self.log_probs, self.ids))


def _head(model: nn.Module, arch: Arch, hidden: list[Tensor]) -> Tensor:
    norm, head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
    return torch.cat([head(norm(h)).float().log_softmax(-1) for h in hidden])


@torch.no_grad()
def dense_cache(model: nn.Module, arch: Arch, ids: Tensor, batch_size: int = 4) -> DenseCache:
    """One forward pass of the parent over ``ids`` ([n, T]), recording each layer's inputs and outputs."""
    layers = decoder_layers(model, arch)
    inputs = capture_layer0_inputs(model, arch, ids, batch_size)
    all_inputs, all_outputs = [], []
    for index, layer in enumerate(layers):
        inputs = inputs.for_layer(index)
        outputs = _run_layer(layer, inputs)
        all_inputs.append(inputs)
        all_outputs.append(outputs)
        inputs = inputs.passed_on(outputs)
    return DenseCache(all_inputs, all_outputs, _head(model, arch, inputs.hidden), ids)


@torch.no_grad()
def layer_inputs(model: nn.Module, arch: Arch, ids: Tensor, batch_size: int = 4) -> list[LayerInputs]:
    """The parent's input to every decoder layer for ``ids`` ([n, T]); no head (no [n, T, V] log-probs)."""
    inputs = capture_layer0_inputs(model, arch, ids, batch_size)
    result = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        inputs = inputs.for_layer(index)
        result.append(inputs)
        inputs = inputs.passed_on(_run_layer(layer, inputs))
    return result


@torch.no_grad()
def tail_log_probs(model: nn.Module, arch: Arch, cache: DenseCache, index: int, layer: nn.Module) -> Tensor:
    """Log-probs [n, T, V] of the parent with decoder layer ``index`` replaced by ``layer`` (layers after it are
    the parent's, run on the cached input of layer ``index``)."""
    layers = decoder_layers(model, arch)
    inputs = cache.inputs[index]
    hidden = _run_layer(layer, inputs)
    for later_index in range(index + 1, len(layers)):
        hidden = _run_layer(layers[later_index], inputs.passed_on(hidden).for_layer(later_index))
    return _head(model, arch, hidden)


@dataclass
class BlockScore:
    """Scores of one variant: KL(parent ‖ variant), LM-loss increase, local output error, and whether the KL/loss
    were measured (exact) or estimated from the local error (``estimate="local"``)."""

    kl: float
    lm_loss: float
    local: float
    exact: bool
    seconds: float


Realize = Callable[[nn.Module, int, Variant], None]


@torch.no_grad()
def _local_error(layer: nn.Module, cache: DenseCache, index: int) -> float:
    outs = _run_layer(layer, cache.inputs[index])
    return float(sum(((o - d).double() ** 2).sum() for o, d in zip(outs, cache.outputs[index], strict=True)))


def score_sub_block(
    model: nn.Module,
    arch: Arch,
    cache: DenseCache,
    index: int,
    variants: list[Variant],
    realize: Realize,
    estimate: str = "exact",
) -> list[BlockScore]:
    """Scores of the variants of one sub-block of layer ``index`` (variants[0] = the parent scores 0).

    ``realize(layer_copy, index, variant)`` turns a copy of the parent layer into the variant in place."""
    parent = decoder_layers(model, arch)[index]
    anchor = len(variants) - 1
    local: list[float] = [0.0]
    measured: dict[int, tuple[float, float, float]] = {}
    for j, v in enumerate(variants[1:], start=1):
        clock = time.perf_counter()
        layer = copy.deepcopy(parent)
        realize(layer, index, v)
        local.append(_local_error(layer, cache, index))
        if estimate == "exact" or j == anchor:
            log_q = tail_log_probs(model, arch, cache, index, layer)
            kl = float(kl_divergence(cache.log_probs, log_q))
            measured[j] = (kl, float(next_token_loss(log_q, cache.ids)) - cache.loss, time.perf_counter() - clock)
        else:
            measured[j] = (float("nan"), float("nan"), time.perf_counter() - clock)
    scores = [BlockScore(0.0, 0.0, 0.0, True, 0.0)]
    a_kl, a_loss, _ = measured.get(anchor, (0.0, 0.0, 0.0))
    for j in range(1, len(variants)):
        kl, loss, seconds = measured[j]
        exact = estimate == "exact" or j == anchor
        if not exact:
            ratio = local[j] / local[anchor] if local[anchor] > 0 else 0.0
            kl, loss = a_kl * ratio, a_loss * ratio
        scores.append(BlockScore(kl, loss, local[j], exact, seconds))
    return scores
