"""A stand-in for ``compress.session.Session`` whose metrics are closed-form functions of the recipe.

The driver, storage, samplers and reports run for real; only the model is replaced, so a trial costs
``delay`` seconds instead of a calibration and an evaluation. Shape: 4 layers, 3 KV groups, MLP width 96.
"""

from __future__ import annotations

import re
import time
from typing import Any

from compress.recipe import PruneConfig, PruneStep, QuantizeStep, Recipe
from quant.datatypes import DATATYPE_SETS

ATTN_PARAMS, MLP_PARAMS, OTHER_PARAMS = 1000, 2000, 5000  # per dense layer; embeddings + norms


class SyntheticSession:
    num_layers = 4
    n_kv = 3
    intermediate_size = 96
    layers_prefix = "model.layers"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[list[str]] = []
        self.recipes: list[Recipe] = []

    @classmethod
    def open(cls, recipe: Recipe) -> SyntheticSession:
        return cls()

    def widths(self, recipe: Recipe) -> tuple[list[float], list[float]]:
        prune = next((s.prune for s in recipe.steps if isinstance(s, PruneStep)), None)
        if prune is None:
            return [1.0] * self.num_layers, [1.0] * self.num_layers
        if prune.attn_groups is not None and prune.mlp_channels is not None:
            return [k / self.n_kv for k in prune.attn_groups], [c / self.intermediate_size for c in prune.mlp_channels]
        keep = 1 - prune.ratio
        # AL-AM keeps early layers wider (as FLAP tends to), at the same average
        tilt = 0.1 if prune.structure == "AL-AM" else 0.0
        attn = [min(1.0, keep + tilt * (1.5 - i) / 1.5) for i in range(self.num_layers)]
        return attn, [keep] * self.num_layers

    def layer_bits(self, recipe: Recipe) -> list[int]:
        quant = next((s.quantize for s in recipe.steps if isinstance(s, QuantizeStep)), None)
        if quant is None:
            return [32] * self.num_layers
        bits = []
        for i in range(self.num_layers):
            name = f"model.layers.{i}.mlp.down_proj"
            dtypes = next((o.dtypes for o in quant.overrides if re.search(o.match, name)), None) or quant.dtypes
            bits.append(DATATYPE_SETS[dtypes].bits)
        return bits

    def measure(self, recipe: Recipe, objectives: list[str]) -> dict[str, float]:
        self.calls.append(list(objectives))
        self.recipes.append(recipe)
        attn, mlp = self.widths(recipe)
        bits = self.layer_bits(recipe)
        sizes = [ATTN_PARAMS * a + MLP_PARAMS * m for a, m in zip(attn, mlp, strict=True)]
        params = OTHER_PARAMS + sum(sizes)
        loss = sum((1 - a) ** 2 + 0.5 * (1 - m) ** 2 for a, m in zip(attn, mlp, strict=True))
        loss += sum({3: 0.3, 4: 0.05}.get(b, 0.0) for b in bits)
        all_metrics: dict[str, Any] = {
            "ppl": 10.0 * (1 + loss),
            "phi": -loss,
            "phi_norm": -loss / self.num_layers,
            "params": float(params),
            "prunable_params": float(sum(sizes)),
            "avg_bits": sum(s * b for s, b in zip(sizes, bits, strict=True)) / max(sum(sizes), 1.0),
            "bytes": OTHER_PARAMS * 4 + sum(s * b / 8 for s, b in zip(sizes, bits, strict=True)),
            "latency_ms": params / 1000,
        }
        if self.delay:
            time.sleep(self.delay)
        return {name: float(all_metrics.get(name, 0.5)) for name in objectives}

    def allocation(self, prune: PruneConfig) -> tuple[list[int], list[int]]:
        """A FLAP-like allocation: wide early layers, narrow late ones, the last attention removed."""
        return [3, 2, 1, 0], [96, 64, 64, 32]


def synthetic_recipe(out_dir: str, **search: Any) -> dict[str, Any]:
    """A search recipe on a (never loaded) model, with a search block built from ``search``."""
    block: dict[str, Any] = {
        "trials": 6,
        "sampler": {"name": "nsga2", "population": 4},
        "space": {"ratio": {"low": 0.1, "high": 0.5, "step": 0.05}, "structure": ["AL-AM", "UL-UM"]},
        "objectives": ["ppl", "params"],
        "heartbeat": {"interval": 1, "grace": 3},
    }
    block.update(search)
    return {
        "model": "synthetic",
        "seed": 0,
        "steps": [{"prune": {"ratio": 0.2, "mlp_step": 32}}, {"quantize": {"dtypes": "bitmod4", "group_size": 32}}],
        "output": {"dir": out_dir},
        "evaluation": {"perplexity": {"max_windows": 2}, "lm_eval": None},
        "search": block,
    }
