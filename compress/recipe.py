"""Recipes: YAML → pydantic models (``extra="forbid"``: a typo is an error naming the field).

A recipe is data: which model, which calibration data, which steps, where to write, how to evaluate. It is stored
verbatim (after validation, with defaults filled in) in every checkpoint it produces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from compress.recipe_yaml import apply_overrides, check_shape, load_recipe_dict, load_yaml
from compress.schema import MAX_COUNT, MAX_SEED, Strict, available_device, compiled_regex, format_error, task_names
from compress.step_configs import (
    DistillConfig,
    DistillStep,
    NasConfig,
    NasStep,
    PruneConfig,
    PruneStep,
    QuantizeConfig,
    QuantizeStep,
    QuantOverride,
    Step,
)
from quant.errors import InputError

__all__ = [  # the recipe schema in one import (step configs, the schema base and YAML reading have their modules)
    "CalibrationConfig", "DistillConfig", "DistillStep", "EvaluationConfig", "LmEvalConfig", "NasConfig", "NasStep",
    "OutputConfig", "PerplexityConfig", "PruneConfig", "PruneStep", "QuantOverride", "QuantizeConfig",
    "QuantizeStep", "Recipe", "Step", "Strict", "apply_overrides", "available_device", "check_shape",
    "compiled_regex", "format_error", "load_recipe", "load_recipe_dict", "load_yaml", "parse_recipe", "task_names",
]  # fmt: skip


class CalibrationConfig(Strict):
    """n windows × seq_len tokens drawn (seeded) from ``data``: "web:calibration" or a .txt/.jsonl path."""

    data: str = "web:calibration"
    samples: int = Field(128, ge=1, le=MAX_COUNT)
    seq_len: int = Field(128, ge=8, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)


class PerplexityConfig(Strict):
    """Held-out perplexity over non-overlapping windows of ``data``."""

    data: str = "web:eval"
    seq_len: int = Field(256, ge=8, le=MAX_COUNT)
    max_windows: int | None = Field(64, ge=1, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks: the shipped offline tasks or any task name lm-eval knows."""

    tasks: list[str] = Field(default_factory=lambda: ["secateurs_web_ppl", "secateurs_web_mc"])
    _names = field_validator("tasks")(classmethod(lambda cls, v: task_names(v)))
    limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)
    max_length: int = Field(512, ge=16, le=MAX_COUNT)


class EvaluationConfig(Strict):
    # one text, or a list of texts: the first is reported as heldout/perplexity, every other one as
    # heldout/perplexity@<data> (a list is stored as ``perplexity`` = its first item + ``more_perplexity``)
    perplexity: PerplexityConfig | None = Field(default_factory=PerplexityConfig)
    more_perplexity: list[PerplexityConfig] = Field(default_factory=list)
    lm_eval: LmEvalConfig | None = Field(default_factory=LmEvalConfig)
    dense_baseline: bool = True

    @model_validator(mode="before")
    @classmethod
    def _perplexity_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("perplexity"), list):
            texts = data["perplexity"]
            if not texts:
                raise ValueError("perplexity: give at least one text (or null for none)")
            data = {**data, "perplexity": texts[0], "more_perplexity": [*texts[1:], *data.get("more_perplexity", [])]}
        return data

    @model_validator(mode="after")
    def _more_needs_first(self) -> EvaluationConfig:
        if self.more_perplexity and self.perplexity is None:
            raise ValueError("more_perplexity needs perplexity (the first text)")
        return self

    def perplexity_texts(self) -> PerplexityConfig | list[PerplexityConfig] | None:
        """What ``compress.evaluate.evaluate_model`` measures: the one text, or the list when there are several."""
        if self.perplexity is None or not self.more_perplexity:
            return self.perplexity
        return [self.perplexity, *self.more_perplexity]


class OutputConfig(Strict):
    dir: str = "out/model"
    overwrite: bool = False
    push_to_hub: str | None = None


class Recipe(Strict):
    model: str = "default"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # auto: the checkpoint's own dtype (the default model's GGUF converts to fp32); statistics and solves run in
    # float32/float64 whatever the model's dtype
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # layer streaming (compress.stream): auto = whenever the model is a local safetensors folder and the run allows
    # it (prune + quantize steps, no evaluation); true = demand it; false = load the whole model
    stream: bool | Literal["auto"] = "auto"
    device: str = "cpu"
    _device = field_validator("device")(classmethod(lambda cls, v: available_device(v)))
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    steps: list[Step] = Field(default_factory=list)
    output: OutputConfig = Field(default_factory=OutputConfig)
    evaluation: EvaluationConfig | None = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _prune_before_quantize(self) -> Recipe:
        quantized = False
        for index, step in enumerate(self.steps):
            if isinstance(step, QuantizeStep):
                quantized = True
            elif quantized:
                raise ValueError(f"steps.{index}: prune and nas steps must come before quantize steps")
        return self

    @model_validator(mode="after")
    def _puzzle_windows(self) -> Recipe:
        """Puzzle scores on the first ``puzzle.samples`` calibration windows and fits linear replacements and
        least-squares repairs on the ``puzzle.fit_samples`` after them: the calibration must hold them all."""
        for index, step in enumerate(self.steps):
            puzzle = step.prune.puzzle if isinstance(step, PruneStep) else None
            if puzzle is None:
                continue
            fits = puzzle.allow_linear or puzzle.repair == "least_squares"
            need = puzzle.samples + (puzzle.fit_samples if fits else 0)
            if self.calibration.samples < need:
                field = "fit_samples" if fits else "samples"
                raise ValueError(
                    f"steps.{index}.prune.puzzle.{field}: needs at least {need} calibration windows (scoring "
                    f"{puzzle.samples}"
                    + (f" + fitting {puzzle.fit_samples}" if fits else "")
                    + f"), calibration.samples is {self.calibration.samples}"
                )
        return self


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    """Validate a recipe dict; errors name the field (dotted path) and what was expected."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    check_shape(data, origin)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise InputError(format_error(err, origin)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return parse_recipe(apply_overrides(load_recipe_dict(path), overrides or []), origin=str(path))
