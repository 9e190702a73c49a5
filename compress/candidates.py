"""The one cache of dense-model state that many candidates share (NAS, search, the block library).

A search or a NAS run evaluates hundreds of compressed variants of one loaded dense model. What they have in common
is computed once, here: the FLAP statistics of the o_proj / down_proj inputs (one layer-wise calibration pass),
the proxy's base gradient traces, and packed linears (keyed by the steps before, the layer and the datatype set).
:meth:`DenseCache.realize` turns a prune config into a pruned copy with exactly the prune step's code, so a
candidate measured here is the model ``secateurs run`` writes for the same config.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import (
    Arch,
    attention_layout,
    decoder_layers,
    linear_at,
    linear_shape,
    model_config,
    set_submodule,
)
from compress.calibration import LayerStats
from compress.nas.proxy import TraceProxy
from compress.nas.space import Candidate, SpaceSpec, from_counts
from compress.prune.allocate import ModuleUnits
from compress.prune.pruner import (
    apply_masks,
    collect_statistics,
    mask_summary,
    module_units,
    needs_statistics,
    plan_masks,
    prune_model,
)
from compress.quantize import module_settings, target_paths
from compress.recipe import PruneConfig, QuantizeConfig
from quant.qlinear import QuantLinear
from quant.quantize import quantize_linear


@dataclass
class Realized:
    """A pruned copy of the dense model and the keep-masks that made it ([n_kv] and [F] bool per layer)."""

    model: nn.Module
    attn: list[Tensor]
    mlp: list[Tensor]

    def summary(self) -> dict[str, Any]:
        return mask_summary(self.attn, self.mlp)

    def __iter__(self) -> Iterator[Any]:  # model, attn, mlp = cache.realize(cfg)
        return iter((self.model, self.attn, self.mlp))


class DenseCache:
    """A dense model + calibration tokens, with its statistics, proxy traces and packed linears computed once."""

    def __init__(
        self,
        model: nn.Module,
        arch: Arch,
        calibration: Tensor,
        batch_size: int = 8,
        device: str | None = None,
        proxy_tokens: Callable[[], Tensor] | None = None,
        proxy_batch_size: int = 4,
        stats: list[LayerStats] | None = None,
    ) -> None:
        self.dense = model.eval()
        self.arch = arch
        self.calibration = calibration  # [n, T] token ids
        self.batch_size, self.device = batch_size, device
        self._proxy_tokens, self.proxy_batch_size = proxy_tokens, proxy_batch_size
        self._stats = stats
        self._proxy: TraceProxy | None = None
        self._units: list[tuple[ModuleUnits, ModuleUnits]] | None = None
        self.base_seconds = 0.0  # time spent on the proxy's base traces
        # packed linears by (steps before, linear name, datatype set, group size, the step's other settings): a
        # plain (not activation-aware) quantization of a linear depends on nothing else; read-only once packed
        self._packed: dict[tuple[str, str, str, int | None, str], QuantLinear] = {}
        layers = decoder_layers(model, arch)
        self.num_layers = len(layers)
        self.n_kv = attention_layout(model_config(model), layers[0], arch).n_kv
        self.intermediate_size = linear_shape(layers[0], arch.down)[1]
        self.layers_prefix = arch.layers

    @property
    def stats(self) -> list[LayerStats]:
        """Dense statistics of the o_proj / down_proj inputs of every layer (one calibration pass, on demand)."""
        if self._stats is None:
            self._stats = collect_statistics(self.dense, self.arch, self.calibration, self.batch_size, self.device)
        return self._stats

    @property
    def proxy(self) -> TraceProxy:
        """The dense model's base gradient traces (on demand, from the proxy tokens)."""
        if self._proxy is None:
            if self._proxy_tokens is None:
                raise ValueError("this cache was built without proxy tokens")
            clock = time.perf_counter()
            self._proxy = TraceProxy(self.dense, self.arch, self._proxy_tokens(), self.proxy_batch_size)
            self.base_seconds = time.perf_counter() - clock
        return self._proxy

    @property
    def flap_units(self) -> list[tuple[ModuleUnits, ModuleUnits]]:
        """Standardised FLAP (WIFV) unit scores of every layer: (attention KV groups, MLP channels)."""
        if self._units is None:
            self._units = module_units(self.dense, self.arch, PruneConfig(method="flap"), self.stats)
        return self._units

    def _stats_for(self, cfg: PruneConfig) -> list[LayerStats] | list[None]:
        return self.stats if needs_statistics(cfg) else [None] * self.num_layers

    def masks(self, cfg: PruneConfig) -> tuple[list[Tensor], list[Tensor]]:
        """Keep-masks that ``cfg`` (dense statistics) gives on the dense model: no copy, no surgery."""
        return plan_masks(self.dense, self.arch, cfg, self._stats_for(cfg))

    def allocation(self, cfg: PruneConfig) -> tuple[list[int], list[int]]:
        """Kept KV groups and MLP channels per layer that ``cfg`` gives."""
        attn, mlp = self.masks(cfg)
        return [int(a.sum()) for a in attn], [int(m.sum()) for m in mlp]

    def realize(self, cfg: PruneConfig) -> Realized:
        """A pruned copy of the dense model: the prune step with dense statistics (the cached ones)."""
        if cfg.statistics != "dense" and needs_statistics(cfg):
            raise ValueError("the candidate cache realises dense-statistics prune configs only")
        model = copy.deepcopy(self.dense)
        stats = self._stats_for(cfg)
        attn, mlp = plan_masks(model, self.arch, cfg, stats)
        if cfg.reconstruct == "least_squares":  # the per-candidate refit (ranks repaired candidates)
            prune_model(model, self.arch, cfg, self.calibration, self.batch_size, self.device, self.stats)
        else:
            apply_masks(model, self.arch, cfg, stats, attn, mlp)
        return Realized(model, attn, mlp)

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.dense)

    def quantize(self, model: nn.Module, cfg: QuantizeConfig, before: str) -> dict[str, str]:
        """The quantize step (plain datatype choice) on ``model`` with packed linears shared across candidates:
        the same ``quantize_linear`` call as :func:`compress.quantize.quantize_model`, so the result is identical.
        ``before`` identifies the steps that ran before (the weights being packed). Returns {linear: datatypes}."""
        record: dict[str, str] = {}
        settings = cfg.model_dump_json(exclude={"overrides", "modules", "export", "dtypes", "group_size"})
        for index, layer in enumerate(decoder_layers(model, self.arch)):
            for path in target_paths(cfg, self.arch, layer):
                full = f"{self.arch.layers}.{index}.{path}"
                dtypes, group_size = module_settings(cfg, full)
                key = (before, full, dtypes, group_size, settings)
                if key not in self._packed:
                    # compress.quantize's call without statistics (tests/compress/test_session.py keeps them equal)
                    self._packed[key] = quantize_linear(
                        linear_at(layer, path), dtypes, group_size, cfg.shrink_factors, None,
                        scale_bits=cfg.scale_bits, compact_storage=True,
                    )  # fmt: skip
                set_submodule(layer, path, self._packed[key])
                record[full] = dtypes
        return record

    def nas(self, mlp_step: int = 32, skip_from: int | None = None, allow_skip: bool = True,
            compensation: bool = True, least_squares: bool = False) -> NasSearch:  # fmt: skip
        """The TraceNAS view of this cache: its candidate space and the proxy measurements."""
        config = model_config(self.dense)
        layers = decoder_layers(self.dense, self.arch)
        layouts = {attention_layout(config, layer, self.arch) for layer in layers}
        widths = {linear_shape(layer, self.arch.down)[1] for layer in layers}
        if len(layouts) != 1 or len(widths) != 1:
            raise ValueError("NAS needs a dense model with identical layers (got an already pruned model)")
        layout, first = layouts.pop(), layers[0]
        spec = SpaceSpec(
            n_layers=len(layers), n_kv=layout.n_kv, group=layout.group, head_dim=layout.head_dim,
            hidden=int(config.hidden_size), intermediate=widths.pop(), mlp_step=mlp_step, skip_from=skip_from,
            allow_skip=allow_skip, qkv_bias=linear_shape(first, self.arch.q)[2],
            out_bias=linear_shape(first, self.arch.o)[2] or linear_shape(first, self.arch.down)[2],
            compensation=compensation,
        )  # fmt: skip
        return NasSearch(self, spec, least_squares)


@dataclass
class NasSearch:
    """TraceNAS candidates (pure shapes, :mod:`compress.nas.space`) realised and scored on a :class:`DenseCache`:
    FLAP scores pick the kept units, FLAP's compensation when the space says so — the prune step with counts."""

    cache: DenseCache
    spec: SpaceSpec
    least_squares: bool = False  # candidates refitted by least squares (reconstruct: least_squares)

    def prune_config(self, cand: Candidate) -> PruneConfig:
        """The prune step that realises ``cand`` (integer widths: no fraction round trip)."""
        if self.least_squares:
            return PruneConfig(
                method="flap", attn_groups=list(cand.attn), mlp_channels=list(cand.mlp), reconstruct="least_squares"
            )
        return PruneConfig(
            method="flap",
            attn_groups=list(cand.attn),
            mlp_channels=list(cand.mlp),
            bias_compensation=self.spec.compensation,
        )

    def realize(self, cand: Candidate) -> Realized:
        self.spec.check(cand)
        return self.cache.realize(self.prune_config(cand))

    def kept_score(self, cand: Candidate) -> float:
        """Σ of the standardised FLAP scores of the kept units (what FLAP's adaptive allocation maximises)."""
        total = 0.0
        for (a, m), k, c in zip(self.cache.flap_units, cand.attn, cand.mlp, strict=True):
            total += float(torch.sort(a.scores, descending=True).values[:k].sum())
            total += float(torch.sort(m.scores, descending=True).values[:c].sum())
        return total

    def measure(self, cand: Candidate) -> dict[str, Any]:
        """Φ, Φ_norm, gradient norm, kept FLAP score and parameter count of one candidate (+ seconds for Φ)."""
        proxy = self.cache.proxy
        clock = time.perf_counter()
        realized = self.realize(cand)
        score = proxy.score(realized.model, realized.attn, realized.mlp)
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
        groups, channels = self.cache.allocation(PruneConfig(method="flap", ratio=1.0 - params_ratio))
        lo, hi = self.spec.window(params_ratio, tolerance)
        return from_counts(self.spec, groups, channels, lo, hi, random.Random(seed))

    def uniform_candidate(self, params_ratio: float, tolerance: float, seed: int = 0) -> Candidate:
        """Every layer keeps the same fraction (attention rounded to whole groups), repaired into the window."""
        spec = self.spec
        lo, hi = spec.window(params_ratio, tolerance)
        groups = [max(1, round(params_ratio * spec.n_kv))] * spec.n_layers
        channels = [round(params_ratio * spec.intermediate)] * spec.n_layers
        return from_counts(spec, groups, channels, lo, hi, random.Random(seed))
