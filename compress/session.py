"""A recipe's steps on the dense-model cache, measured through the metric table (the search's evaluator).

``secateurs run`` loads a model, compresses it once and writes a checkpoint. A search evaluates hundreds of
variants of one recipe on the same model: :class:`Session` loads the model and draws the calibration tokens once,
keeps the shared dense state in a :class:`compress.candidates.DenseCache`, applies each candidate recipe's steps
to a fresh copy with the same step code as ``run`` (a dense-statistics prune step is realised from the cached
statistics, which is what ``run`` computes too, so a materialised trial reproduces its measurement), and measures
it through :mod:`compress.metrics`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import arch_for
from compress.candidates import DenseCache
from compress.corpus import calibration_batches
from compress.evaluate import lm_eval_tasks
from compress.loading import load_model, resolve_dtype, resolve_source
from compress.metrics import Probe, measure, metric
from compress.prune.pruner import needs_statistics
from compress.puzzle.config import PuzzleConfig
from compress.puzzle.step import run_puzzle
from compress.recipe import LmEvalConfig, NasStep, PerplexityConfig, PruneStep, QuantizeStep, Recipe
from compress.steps import StepContext, apply_step
from quant.errors import InputError


@dataclass
class Built:
    """A candidate model and what building it recorded."""

    model: nn.Module
    steps: list[dict[str, Any]]
    masks: tuple[list[Tensor], list[Tensor]] | None = None  # keep-masks of the (single) prune step
    pruned: nn.Module | None = field(default=None, repr=False)  # the model before quantization (kept for Φ)


class Session:
    """Loaded dense model + its :class:`DenseCache`, reused across many candidate recipes."""

    def __init__(
        self, recipe: Recipe, model: nn.Module, tokenizer: Any, proxy_samples: int = 4, proxy_seq_len: int = 128
    ):
        self.recipe = recipe
        self.tokenizer = tokenizer
        cal = recipe.calibration
        calibration = calibration_batches(tokenizer, cal.data, cal.samples, cal.seq_len, recipe.seed)

        def proxy_tokens() -> Tensor:
            return calibration_batches(tokenizer, cal.data, proxy_samples, proxy_seq_len, recipe.seed + 1)

        self.cache = DenseCache(model, arch_for(model.config), calibration, cal.batch_size, None, proxy_tokens)
        self.arch = self.cache.arch
        self.num_layers, self.n_kv = self.cache.num_layers, self.cache.n_kv
        self.intermediate_size, self.layers_prefix = self.cache.intermediate_size, self.cache.layers_prefix
        self._last: tuple[str, Built] | None = None  # the last candidate built (measure is often called twice)

    @classmethod
    def open(cls, recipe: Recipe, proxy_samples: int = 4, proxy_seq_len: int = 128) -> Session:
        dtype = resolve_dtype(recipe.dtype, resolve_source(recipe.model))
        loaded = load_model(recipe.model, dtype=dtype, device=recipe.device)
        return cls(recipe, loaded.model, loaded.tokenizer, proxy_samples, proxy_seq_len)

    def allocation(self, cfg: Any) -> tuple[list[int], list[int]]:
        """Kept KV groups and MLP widths per layer that a prune config gives on this model (no surgery, no copy)."""
        return self.cache.allocation(cfg)

    def build(self, recipe: Recipe, keep_float: bool = False) -> Built:
        """Apply ``recipe.steps`` to a copy of the dense model (model, calibration and seed come from the session).

        ``keep_float`` also keeps a copy of the model as it was before its first quantize step (for Φ)."""
        built: Built | None = None
        ctx: StepContext | None = None
        for index, step in enumerate(recipe.steps):
            if isinstance(step, NasStep):
                raise InputError(f"steps.{index}: a nas step cannot be part of a search candidate (search its space)")
            if isinstance(step, PruneStep) and step.prune.structure == "puzzle" and built is None:
                built = Built(self.cache.copy(), [])  # Puzzle-MIP on the session's statistics (library cached)
                record = run_puzzle(
                    built.model, self.arch, step.prune.ratio, step.prune.puzzle or PuzzleConfig(),
                    self.cache.calibration, recipe.calibration.batch_size, self.cache.stats, step.prune, recipe.device,
                )  # fmt: skip
                built.steps.append({"summary": "puzzle (session, dense statistics)", **record})
                continue
            cached_prune = isinstance(step, PruneStep) and (
                step.prune.statistics == "dense" or not needs_statistics(step.prune)
            )
            if cached_prune and built is None:
                assert isinstance(step, PruneStep)
                realized = self.cache.realize(step.prune)
                built = Built(realized.model, [], masks=(realized.attn, realized.mlp))
                summary = f"{step.prune.method} (session, dense statistics)"
                built.steps.append({"summary": summary, **realized.summary()})
                continue
            if cached_prune:
                raise InputError(f"steps.{index}: one prune step per candidate")
            if built is None:
                built = Built(self.cache.copy(), [])
            if ctx is None:
                ctx = StepContext(
                    built.model, self.tokenizer, self.arch, self.cache.calibration, recipe.calibration.batch_size,
                    recipe.device, self.recipe.seed, recipe.calibration.data,
                )  # fmt: skip
            if isinstance(step, QuantizeStep) and keep_float and built.pruned is None:
                built.pruned = copy.deepcopy(built.model)
            if isinstance(step, QuantizeStep) and not step.quantize.activation_aware:
                before = json.dumps([s.model_dump(mode="json") for s in recipe.steps[:index]], sort_keys=True)
                modules = self.cache.quantize(built.model, step.quantize, before)
                built.steps.append({"summary": f"quantize {step.quantize.dtypes} (session cache)", "modules": modules})
                continue
            built.steps.append(apply_step(step, ctx))
        if built is None:
            built = Built(self.cache.copy(), [])
        if built.pruned is None and not any(isinstance(step, QuantizeStep) for step in recipe.steps):
            built.pruned = built.model
        return built

    def measure(self, recipe: Recipe, objectives: list[str]) -> dict[str, float]:
        """Values of the metrics ``objectives`` (names of :data:`compress.metrics.METRICS` or
        ``lm_eval:<task>/<metric>``) for one candidate recipe.

        Φ / Φ_norm are computed on the pruned model before any quantize step (the proxy needs float weights) and
        need a dense-statistics prune step (or none)."""
        wants_phi = any(metric(name).proxy for name in objectives)
        key = json.dumps([s.model_dump(mode="json") for s in recipe.steps], sort_keys=True)
        if self._last is not None and self._last[0] == key and (self._last[1].pruned is not None or not wants_phi):
            built = self._last[1]
        else:
            self._last = None  # free the previous candidate before building the next
            built = self.build(recipe, keep_float=wants_phi)
            self._last = (key, built)
        ev = recipe.evaluation
        probe = Probe(
            built.model,
            self.arch,
            self.tokenizer,
            self.cache.calibration,
            ev.perplexity if ev is not None and ev.perplexity is not None else PerplexityConfig(),
            phi=self._phi(recipe, built),
            lm_eval=self._lm_eval(recipe, built.model),
        )
        return measure(probe, objectives)

    def _phi(self, recipe: Recipe, built: Built) -> Any:
        def score() -> Any:
            masks = built.masks
            if masks is None:
                if any(isinstance(s, PruneStep) for s in recipe.steps):
                    raise InputError("objective phi: needs prune.statistics: dense (progressive masks are not known)")
                masks = (
                    [torch.ones(self.n_kv, dtype=torch.bool)] * self.num_layers,
                    [torch.ones(self.intermediate_size, dtype=torch.bool)] * self.num_layers,
                )
            assert built.pruned is not None
            return self.cache.proxy.score(built.pruned, *masks)

        return score

    def _lm_eval(self, recipe: Recipe, model: nn.Module) -> Any:
        ev = recipe.evaluation
        base = ev.lm_eval if ev is not None and ev.lm_eval is not None else LmEvalConfig()

        def run(tasks: list[str]) -> dict[str, float]:
            cfg = base.model_copy(update={"tasks": tasks})
            return dict(lm_eval_tasks(model, self.tokenizer, cfg, self.recipe.seed)["metrics"])

        return run
