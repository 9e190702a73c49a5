"""A loaded dense model reused across many candidate recipes (the search driver's evaluation engine).

``secateurs run`` loads a model, compresses it once and writes a checkpoint. A search evaluates hundreds of
variants of one recipe on the same model: :class:`Session` loads the model, draws the calibration tokens and
collects the dense FLAP statistics once, then applies each candidate recipe's steps to a fresh copy with the same
step code as ``run`` (dense-statistics prune steps reuse the cached statistics; that is what ``run`` computes
too, so a materialised trial reproduces its measurement).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import (
    Arch,
    arch_for,
    attention_layout,
    decoder_layers,
    linear_at,
    linear_shape,
    model_config,
    present_linears,
    set_submodule,
)
from compress.calibration import LayerStats
from compress.corpus import calibration_batches
from compress.evaluate import lm_eval_tasks, perplexity
from compress.loading import load_model
from compress.nas.proxy import TraceProxy
from compress.prune.pruner import apply_masks, collect_statistics, count_parameters, plan_masks, prunable_parameters
from compress.quantize import module_settings, quant_linears, target_paths
from compress.recipe import (
    LmEvalConfig,
    NasStep,
    PerplexityConfig,
    PruneConfig,
    PruneStep,
    QuantizeConfig,
    QuantizeStep,
    Recipe,
)
from compress.steps import StepContext, apply_step
from quant.errors import InputError
from quant.qlinear import QuantLinear
from quant.quantize import quantize_linear

OBJECTIVES = ("ppl", "phi", "phi_norm", "params", "prunable_params", "bytes", "avg_bits", "latency_ms")
LOWER_IS_BETTER = {"ppl", "params", "prunable_params", "bytes", "avg_bits", "latency_ms"}


def direction(objective: str) -> str:
    """ "minimize" or "maximize" for an objective name (lm_eval metrics: perplexities and bits/byte minimise)."""
    if objective.startswith("lm_eval:"):
        metric = objective.split("/")[-1]
        return "minimize" if "perplexity" in metric or "bits_per_byte" in metric else "maximize"
    if objective not in OBJECTIVES:
        raise InputError(
            f"unknown objective {objective!r}; expected one of {list(OBJECTIVES)} or lm_eval:<task>/<metric>"
        )
    return "minimize" if objective in LOWER_IS_BETTER else "maximize"


@dataclass
class Built:
    """A candidate model and what building it recorded."""

    model: nn.Module
    steps: list[dict[str, Any]]
    masks: tuple[list[Tensor], list[Tensor]] | None = None  # keep-masks of the (single) prune step
    pruned: nn.Module | None = field(default=None, repr=False)  # the model before quantization (kept for Φ)


class Session:
    """Loaded dense model + calibration tokens + dense statistics, reused across many candidate recipes."""

    def __init__(
        self, recipe: Recipe, model: nn.Module, tokenizer: Any, proxy_samples: int = 4, proxy_seq_len: int = 128
    ):
        self.recipe = recipe
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.arch: Arch = arch_for(model.config)
        cal = recipe.calibration
        self.calibration = calibration_batches(tokenizer, cal.data, cal.samples, cal.seq_len, recipe.seed)
        self.proxy_samples = proxy_samples
        self.proxy_seq_len = proxy_seq_len
        self._stats: list[LayerStats] | None = None
        self._proxy: TraceProxy | None = None
        self._last: tuple[str, Built] | None = None  # the last candidate built (measure is often called twice)
        # packed linears by (steps before, linear name, datatype set, group size, shrink factors): a plain
        # (not activation-aware) quantization of a linear depends on nothing else, so mixed-precision candidates
        # share them; the weights are read-only once packed
        self._packed: dict[tuple[str, str, str, int | None, tuple[float, ...]], QuantLinear] = {}
        layers = decoder_layers(model, self.arch)
        self.num_layers = len(layers)
        self.n_kv = attention_layout(model_config(model), layers[0], self.arch).n_kv
        self.intermediate_size = linear_shape(layers[0], self.arch.down)[1]

    @classmethod
    def open(cls, recipe: Recipe, proxy_samples: int = 4, proxy_seq_len: int = 128) -> Session:
        loaded = load_model(recipe.model, dtype=getattr(torch, recipe.dtype), device=recipe.device)
        return cls(recipe, loaded.model, loaded.tokenizer, proxy_samples, proxy_seq_len)

    @property
    def dense_stats(self) -> list[LayerStats]:
        if self._stats is None:
            self._stats = collect_statistics(
                self.model, self.arch, self.calibration, self.recipe.calibration.batch_size
            )
        return self._stats

    @property
    def proxy(self) -> TraceProxy:
        if self._proxy is None:
            cal = self.recipe.calibration
            ids = calibration_batches(
                self.tokenizer, cal.data, self.proxy_samples, self.proxy_seq_len, self.recipe.seed + 1
            )
            self._proxy = TraceProxy(self.model, self.arch, ids)
        return self._proxy

    def allocation(self, cfg: PruneConfig) -> dict[str, list[int]]:
        """Kept KV groups and MLP widths per layer that ``cfg`` gives on this model (no surgery, no copy)."""
        stats = self.dense_stats if cfg.method != "magnitude-sp" else [None] * self.num_layers
        attn, mlp = plan_masks(self.model, self.arch, cfg, stats)
        return {"kv_groups": [int(a.sum()) for a in attn], "intermediate_sizes": [int(m.sum()) for m in mlp]}

    def build(self, recipe: Recipe, keep_float: bool = False) -> Built:
        """Apply ``recipe.steps`` to a copy of the dense model (model, calibration and seed come from the session).

        ``keep_float`` also keeps a copy of the model as it was before its first quantize step (for Φ)."""
        model = copy.deepcopy(self.model)
        ctx = StepContext(
            model,
            self.tokenizer,
            self.arch,
            self.calibration,
            recipe.calibration.batch_size,
            recipe.device,
            self.recipe.seed,
            recipe.calibration.data,
        )
        built = Built(model, [])
        for index, step in enumerate(recipe.steps):
            if isinstance(step, NasStep):
                raise InputError(f"steps.{index}: a nas step cannot be part of a search candidate (search its space)")
            if isinstance(step, PruneStep) and step.prune.statistics == "dense" and step.prune.method != "magnitude-sp":
                if built.masks is not None:
                    raise InputError(f"steps.{index}: one prune step per candidate")
                cfg = step.prune
                attn, mlp = plan_masks(model, self.arch, cfg, self.dense_stats)
                apply_masks(model, self.arch, cfg, self.dense_stats, attn, mlp)
                built.masks = (attn, mlp)
                built.steps.append(
                    {
                        "summary": f"{cfg.method} (session, dense statistics)",
                        "kv_groups": [int(a.sum()) for a in attn],
                        "intermediate_sizes": [int(m.sum()) for m in mlp],
                    }
                )
                continue
            if isinstance(step, QuantizeStep) and keep_float and built.pruned is None:
                built.pruned = copy.deepcopy(model)
            if isinstance(step, QuantizeStep) and not step.quantize.activation_aware:
                before = json.dumps([s.model_dump(mode="json") for s in recipe.steps[:index]], sort_keys=True)
                built.steps.append(self._quantize_cached(model, step.quantize, before))
                continue
            built.steps.append(apply_step(step, ctx))
        if built.pruned is None and not any(isinstance(step, QuantizeStep) for step in recipe.steps):
            built.pruned = model
        return built

    def _quantize_cached(self, model: nn.Module, cfg: QuantizeConfig, before: str) -> dict[str, Any]:
        """The quantize step (plain datatype choice) with packed linears reused across candidates; the same
        ``quantize_linear`` call as :func:`compress.quantize.quantize_model` makes, so the result is identical."""
        record: dict[str, str] = {}
        for index, layer in enumerate(decoder_layers(model, self.arch)):
            for path in target_paths(cfg, self.arch, layer):
                full = f"{self.arch.layers}.{index}.{path}"
                dtypes, group_size = module_settings(cfg, full)
                key = (before, full, dtypes, group_size, tuple(cfg.shrink_factors))
                if key not in self._packed:
                    self._packed[key] = quantize_linear(linear_at(layer, path), dtypes, group_size, cfg.shrink_factors)
                set_submodule(layer, path, self._packed[key])
                record[full] = dtypes
        return {"summary": f"quantize {cfg.dtypes} (session cache)", "modules": record}

    def measure(self, recipe: Recipe, objectives: list[str]) -> dict[str, float]:
        """Objective values of one candidate recipe (see :data:`OBJECTIVES`; plus ``lm_eval:<task>/<metric>``).

        Φ / Φ_norm are computed on the pruned model before any quantize step (the proxy needs float weights) and
        need a dense-statistics prune step (or none)."""
        for name in objectives:
            direction(name)
        wants_phi = "phi" in objectives or "phi_norm" in objectives
        key = json.dumps([s.model_dump(mode="json") for s in recipe.steps], sort_keys=True)
        if self._last is not None and self._last[0] == key and (self._last[1].pruned is not None or not wants_phi):
            built = self._last[1]
        else:
            self._last = None  # free the previous candidate before building the next
            built = self.build(recipe, keep_float=wants_phi)
            self._last = (key, built)
        model = built.model
        out: dict[str, float] = {}
        if wants_phi:
            masks = built.masks
            if masks is None:
                if any(isinstance(s, PruneStep) for s in recipe.steps):
                    raise InputError("objective phi: needs prune.statistics: dense (progressive masks are not known)")
                layers = decoder_layers(self.model, self.arch)
                masks = (
                    [torch.ones(self.n_kv, dtype=torch.bool)] * len(layers),
                    [torch.ones(self.intermediate_size, dtype=torch.bool)] * len(layers),
                )
            assert built.pruned is not None
            score = self.proxy.score(built.pruned, *masks)
            out["phi"], out["phi_norm"] = score.phi, score.phi_norm
        if "ppl" in objectives:
            ev = recipe.evaluation
            cfg = ev.perplexity if ev is not None and ev.perplexity is not None else PerplexityConfig()
            out["ppl"] = perplexity(model, self.tokenizer, cfg)["perplexity"]
        if "params" in objectives:
            out["params"] = float(count_parameters(model))
        if "prunable_params" in objectives:
            out["prunable_params"] = float(prunable_parameters(model, self.arch))
        if "bytes" in objectives:
            out["bytes"] = float(tensor_bytes(model))
        if "avg_bits" in objectives:
            out["avg_bits"] = average_bits(model, self.arch)
        if "latency_ms" in objectives:
            out["latency_ms"] = forward_latency_ms(model, self.calibration)
        lm_eval = [o for o in objectives if o.startswith("lm_eval:")]
        if lm_eval:
            ev = recipe.evaluation
            base = ev.lm_eval if ev is not None and ev.lm_eval is not None else LmEvalConfig()
            tasks = sorted({o.split(":", 1)[1].split("/")[0] for o in lm_eval})
            metrics = lm_eval_tasks(model, self.tokenizer, base.model_copy(update={"tasks": tasks}), self.recipe.seed)
            for o in lm_eval:
                key = o.split(":", 1)[1]
                if key not in metrics["metrics"]:
                    raise InputError(f"objective {o!r}: lm-eval reported {sorted(metrics['metrics'])}")
                out[o] = metrics["metrics"][key]
        return out


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of all unique parameters and buffers (what the checkpoint's safetensors hold, ± headers)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def average_bits(model: nn.Module, arch: Arch) -> float:
    """Stored bits per weight over all decoder linears (packed: planes + scales + type ids + zero points +
    tables; float: the element size)."""
    packed = quant_linears(model)
    bits, weights = 0, 0
    for index, layer in enumerate(decoder_layers(model, arch)):
        for path in present_linears(layer, arch):
            name = f"{arch.layers}.{index}.{path}"
            module = packed.get(name)
            if module is not None:
                bits += 8 * sum(t.numel() * t.element_size() for n, t in module.named_buffers() if n != "bias")
                weights += module.in_features * module.out_features
            else:
                w = linear_at(layer, path).weight
                bits += 8 * w.numel() * w.element_size()
                weights += w.numel()
    return bits / weights


@torch.no_grad()
def forward_latency_ms(model: Any, calibration: Tensor, tokens: int = 512, repeats: int = 3) -> float:
    """Median wall time (ms) of one forward over ``tokens`` tokens (batch 1), after one warm-up."""
    ids = calibration.reshape(1, -1)[:, :tokens]
    device = next(model.parameters()).device
    ids = ids.to(device)
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(1000 * (time.perf_counter() - clock))
    return statistics.median(times)
