"""A search recipe = an ordinary recipe + a top-level ``search:`` block (pydantic, ``extra="forbid"``).

```yaml
search:
  trials: 60                      # total target for the study (a resumed run only runs the remainder)
  sampler: {name: nsga2, population: 20}      # nsga2 | nsga3 | tpe (multivariate) | gp | random
  space:
    keep: {block: 3, attn: {low: 0.3, high: 1.0}, mlp: {low: 0.25, high: 1.0}, skip_from: 15}
    bits: {choices: [3, 4, 8]}
  objectives: [ppl, bytes]        # or {metric: phi, direction: maximize}
  constraints: [{metric: params, max: 1.0e8}, {metric: avg_bits, max: 4.5}]
  seeds: [{kind: uniform, ratio: 0.2}, {kind: flap-adaptive, ratio: 0.2}]
```
Everything outside ``search:`` is the base recipe every trial overlays (see :mod:`search.space`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from compress.recipe import (
    PerplexityConfig,
    Recipe,
    Strict,
    apply_overrides,
    format_error,
    load_recipe_dict,
    parse_recipe,
)
from quant.errors import InputError
from search.objectives import ConstraintConfig, Direction, ObjectiveConfig
from search.seeds import SeedConfig
from search.space import SpaceConfig, check_base

SamplerName = Literal["nsga2", "nsga3", "tpe", "gp", "random"]


class SamplerConfig(Strict):
    """Which optuna sampler proposes candidates. ``seed`` defaults to the recipe's seed."""

    name: SamplerName = "nsga2"
    population: int = Field(20, ge=2, description="NSGA-II/III: candidates per generation")
    startup_trials: int = Field(10, ge=0, description="TPE/GP: random trials before the model takes over")
    crossover_prob: float = Field(0.9, ge=0.0, le=1.0)
    mutation_prob: float | None = Field(None, ge=0.0, le=1.0, description="NSGA: None = 1 / number of params")
    seed: int | None = None


class HeartbeatConfig(Strict):
    """A running trial writes a heartbeat every ``interval`` s; one silent for ``grace`` s (its worker died) is
    marked failed by the next worker that starts a trial, and its parameters are retried up to ``max_retry``."""

    interval: int = Field(30, ge=1)
    grace: int | None = Field(None, ge=1, description="default: 4 × interval")
    max_retry: int = Field(2, ge=0)

    @property
    def grace_seconds(self) -> int:
        return self.grace if self.grace is not None else 4 * self.interval


class SearchConfig(Strict):
    study: str | None = Field(None, description="study name; default: the recipe file's stem")
    storage: str | None = Field(None, description="optuna storage URL; default: sqlite:///<output.dir>/search.db")
    trials: int = Field(50, ge=1, description="target number of finished (complete or pruned) trials")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    space: SpaceConfig
    objectives: list[ObjectiveConfig] = Field(min_length=1, max_length=4)
    constraints: list[ConstraintConfig] = Field(default_factory=list)
    seeds: list[SeedConfig] = Field(default_factory=list)
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    materialize: int = Field(0, ge=0, description="Pareto trials written as full checkpoints after the search")
    perplexity: PerplexityConfig = Field(
        default_factory=lambda: PerplexityConfig(data="web:calibration", max_windows=16),
        description="protocol of the ppl objective: selection text, by default windows of the calibration split, "
        "so that the search never sees the held-out split that materialised checkpoints are evaluated on",
    )
    max_consecutive_failures: int = Field(3, ge=1, description="a worker stops after this many failures in a row")

    @model_validator(mode="after")
    def _distinct_objectives(self) -> SearchConfig:
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: repeated metric in {names}")
        bounds = [c.describe() for c in self.constraints]
        if len(set(bounds)) != len(bounds):
            raise ValueError(f"constraints: repeated constraint in {bounds}")
        return self

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def directions(self) -> list[Direction]:
        return [o.direction or "minimize" for o in self.objectives]


@dataclass
class SearchRecipe:
    """The validated ``search:`` block, the typed base recipe it overlays (parsed once), the base as written (for
    the study's fingerprint, stable when defaults are added), and where they came from."""

    search: SearchConfig
    base: Recipe
    written: dict[str, Any]
    origin: str
    name: str

    @property
    def study_name(self) -> str:
        return self.search.study or self.name

    @property
    def output_dir(self) -> Path:
        return Path(self.base.output.dir)

    @property
    def storage_url(self) -> str:
        if self.search.storage:
            return self.search.storage
        return f"sqlite:///{(self.output_dir / 'search.db').resolve()}"

    def fingerprint(self) -> str:
        """Hash of what makes trials comparable: space, objectives, constraints and the base recipe (minus where
        it writes). A study is only resumed by a recipe with the same fingerprint."""
        base = {k: v for k, v in self.written.items() if k != "output"}
        keyed = {
            "space": self.search.space.model_dump(mode="json"),
            "objectives": [o.model_dump(mode="json") for o in self.search.objectives],
            "constraints": [c.model_dump(mode="json") for c in self.search.constraints],
            "perplexity": self.search.perplexity.model_dump(mode="json"),
            "base": base,
        }
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _SearchBlock(Strict):
    """The ``search:`` block under its own key, so that validation errors name ``search.<field>``."""

    search: SearchConfig


def parse_search_recipe(data: Any, origin: str = "recipe", name: str = "search") -> SearchRecipe:
    """Validate the ``search:`` block and the base recipe; errors name the field (InputError → exit code 2)."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    if "search" not in data:
        raise InputError(f"{origin}: no 'search:' block; `secateurs run` runs a plain recipe")
    written = copy.deepcopy({k: v for k, v in data.items() if k != "search"})
    try:
        search = _SearchBlock.model_validate({"search": data["search"]}).search
    except ValidationError as err:
        raise InputError(format_error(err, origin)) from None
    base = parse_recipe(written, origin)
    check_base(search.space, base)
    return SearchRecipe(search, base, written, origin, name)


def load_search_recipe(path: str | Path, overrides: list[str] | None = None) -> SearchRecipe:
    """Read a search recipe file; ``overrides`` as for ``secateurs run --set`` (``search.trials=100`` works too)."""
    data = apply_overrides(load_recipe_dict(path), overrides or [])
    return parse_search_recipe(data, origin=str(path), name=Path(path).stem)
