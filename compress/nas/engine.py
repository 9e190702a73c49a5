"""NAS plumbing: realise candidates on a dense model (FLAP scores + surgery) and measure them with the proxy.

Which units a candidate keeps: the FLAP WIFV scores of the dense model (statistics of o_proj / down_proj inputs
from one layer-wise calibration pass), the top-k per layer, with FLAP's bias compensation — exactly the prune
step with explicit widths (``prune.attn_groups`` / ``mlp_channels``), so a NAS winner is reproducible as a prune step.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import Arch, attention_layout, decoder_layers, linear_shape, model_config
from compress.calibration import LayerStats
from compress.nas.proxy import TraceProxy
from compress.nas.space import Candidate, SpaceSpec, from_counts
from compress.prune.pruner import apply_masks, collect_statistics, module_units, plan_masks
from compress.recipe import PruneConfig


def space_for(
    model: nn.Module,
    arch: Arch,
    mlp_step: int = 32,
    skip_from: int | None = None,
    allow_skip: bool = True,
    compensation: bool = True,
) -> SpaceSpec:
    """The space of a dense model (all layers must have the same shapes)."""
    config = model_config(model)
    layers = decoder_layers(model, arch)
    layouts = {attention_layout(config, layer, arch) for layer in layers}
    widths = {linear_shape(layer, arch.down)[1] for layer in layers}
    if len(layouts) != 1 or len(widths) != 1:
        raise ValueError("NAS needs a dense model with identical layers (got an already pruned model)")
    layout = layouts.pop()
    first = layers[0]
    return SpaceSpec(
        n_layers=len(layers),
        n_kv=layout.n_kv,
        group=layout.group,
        head_dim=layout.head_dim,
        hidden=int(config.hidden_size),
        intermediate=widths.pop(),
        mlp_step=mlp_step,
        skip_from=skip_from,
        allow_skip=allow_skip,
        qkv_bias=linear_shape(first, arch.q)[2],
        out_bias=linear_shape(first, arch.o)[2] or linear_shape(first, arch.down)[2],
        compensation=compensation,
    )


class NasEngine:
    """A dense model, its FLAP statistics and (optionally) its base gradient traces, shared by many candidates."""

    def __init__(
        self,
        model: nn.Module,
        arch: Arch,
        calibration_ids: Tensor,
        proxy_ids: Tensor | None,
        batch_size: int = 8,
        proxy_batch_size: int = 4,
        mlp_step: int = 32,
        skip_from: int | None = None,
        allow_skip: bool = True,
        bias_compensation: bool = True,
        dense_stats: list[LayerStats] | None = None,
    ) -> None:
        self.dense = model
        self.arch = arch
        self.bias_compensation = bias_compensation
        self.spec = space_for(model, arch, mlp_step, skip_from, allow_skip, bias_compensation)
        self.stats = dense_stats or collect_statistics(model, arch, calibration_ids, batch_size)
        self.units = module_units(model, arch, PruneConfig(method="flap"), self.stats)
        clock = time.perf_counter()
        self.proxy = TraceProxy(model, arch, proxy_ids, proxy_batch_size) if proxy_ids is not None else None
        self.base_seconds = time.perf_counter() - clock

    def prune_config(self, cand: Candidate) -> PruneConfig:
        """The prune step that realises ``cand``."""
        return PruneConfig(
            method="flap",
            attn_groups=list(cand.attn),
            mlp_channels=list(cand.mlp),
            mlp_step=self.spec.mlp_step,
            bias_compensation=self.bias_compensation,
        )

    def realize(self, cand: Candidate) -> tuple[nn.Module, list[Tensor], list[Tensor]]:
        """A pruned copy of the dense model with the candidate's shapes, and its keep-masks."""
        self.spec.check(cand)
        cfg = self.prune_config(cand)
        model = copy.deepcopy(self.dense)
        attn, mlp = plan_masks(model, self.arch, cfg, self.stats)
        apply_masks(model, self.arch, cfg, self.stats, attn, mlp)
        return model, attn, mlp

    def kept_score(self, cand: Candidate) -> float:
        """Σ of the standardised FLAP scores of the kept units (what FLAP's adaptive allocation maximises)."""
        total = 0.0
        for (a, m), k, c in zip(self.units, cand.attn, cand.mlp, strict=True):
            total += float(torch.sort(a.scores, descending=True).values[:k].sum())
            total += float(torch.sort(m.scores, descending=True).values[:c].sum())
        return total

    def measure(self, cand: Candidate) -> dict[str, Any]:
        """Φ, Φ_norm, gradient norm, kept FLAP score and parameter count of one candidate (+ seconds for Φ)."""
        if self.proxy is None:
            raise ValueError("this engine was built without proxy data")
        clock = time.perf_counter()
        model, attn, mlp = self.realize(cand)
        score = self.proxy.score(model, attn, mlp)
        return {
            "phi": score.phi,
            "phi_norm": score.phi_norm,
            "grad_norm": score.grad_norm,
            "proxy_loss": score.loss,
            "kept_score": self.kept_score(cand),
            "params": self.spec.params(cand),
            "active_sub_blocks": cand.n_active,
            "phi_seconds": time.perf_counter() - clock,
        }

    def flap_candidate(self, params_ratio: float, tolerance: float, seed: int = 0) -> Candidate:
        """FLAP's adaptive (AL-AM) allocation at the same budget, MLP widths snapped to the step, repaired into the
        window. (FLAP keeps ≥ 1 unit per module, so it never removes a sub-block.)"""
        cfg = PruneConfig(method="flap", ratio=1.0 - params_ratio, structure="AL-AM")
        attn, mlp = plan_masks(self.dense, self.arch, cfg, self.stats)
        lo, hi = self.spec.window(params_ratio, tolerance)
        rng = random.Random(seed)
        return from_counts(self.spec, [int(a.sum()) for a in attn], [int(m.sum()) for m in mlp], lo, hi, rng)

    def uniform_candidate(self, params_ratio: float, tolerance: float, seed: int = 0) -> Candidate:
        """Every layer keeps the same fraction (attention rounded to whole groups), repaired into the window."""
        spec = self.spec
        lo, hi = spec.window(params_ratio, tolerance)
        groups = [max(1, round(params_ratio * spec.n_kv))] * spec.n_layers
        channels = [round(params_ratio * spec.intermediate)] * spec.n_layers
        return from_counts(spec, groups, channels, lo, hi, random.Random(seed))
