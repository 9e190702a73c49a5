"""Secateurs: make Hugging Face causal LMs smaller and faster without retraining.

>>> import compress
>>> result = compress.run("recipes/smollm2-flap-20.yaml")   # doctest: +SKIP
>>> result.checkpoint, result.report["evaluation"]["rows"]  # doctest: +SKIP

Or on a model you already hold (see ``docs/api.md``):

>>> compress.prune(model, tokenizer, {"method": "flap", "ratio": 0.2})  # doctest: +SKIP
>>> compress.quantize(model, tokenizer, {"dtypes": "bitmod4"})         # doctest: +SKIP
>>> compress.save(model, tokenizer, "out/model", base_model="default")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "load_recipe", "RunResult", "prune", "quantize", "recover", "apply", "save", "history"]

# Imported eagerly, after the submodules they use: ``compress.prune`` and ``compress.quantize`` name the API
# functions, not the submodules of the same names (those stay importable: ``from compress.quantize import ...``).
from compress.api import apply, history, prune, quantize, recover, save  # noqa: E402


def run(recipe: Any, overrides: list[str] | None = None) -> Any:
    """Run a recipe (path, dict or Recipe); returns a RunResult with the model, checkpoint path and report."""
    from compress.pipeline import run as _run

    return _run(recipe, overrides)


def load_recipe(path: str, overrides: list[str] | None = None) -> Any:
    from compress.recipe import load_recipe as _load

    return _load(path, overrides)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from compress.pipeline import RunResult

        return RunResult
    raise AttributeError(name)
