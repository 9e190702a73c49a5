"""Secateurs: make Hugging Face causal LMs smaller and faster without retraining.

>>> import compress
>>> result = compress.run("recipes/smollm2-flap-20.yaml")   # doctest: +SKIP
>>> result.checkpoint, result.report["evaluation"]["rows"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "load_recipe", "RunResult"]


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
