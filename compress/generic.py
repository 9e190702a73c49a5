"""Recipes for causal LMs without an adapter: quantize-only, through the model-in/model-out API.

Weight-only quantization without activation statistics needs nothing architecture-specific beyond "the decoder
linears are ``nn.Linear``" (:func:`compress.api.quantize_generic`), so a recipe whose model is missing from
:data:`compress.adapters.ARCHS` runs when all its steps are such quantize steps; anything else is a one-line error
naming the step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from compress.adapters import ARCHS
from compress.recipe import QuantizeStep, Recipe
from quant.errors import InputError

log = logging.getLogger("secateurs")


def unadapted_architecture(source: str) -> str | None:
    """``architectures[0]`` of a local model folder whose architecture the adapter table lacks; None otherwise
    (an adapted architecture, the default model, a GGUF file or a Hub id)."""
    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        names = json.loads(config.read_text()).get("architectures") or [None]
    except (OSError, ValueError, AttributeError):
        return None  # the loader reports a broken config.json with its own error
    if not names[0]:
        return None  # no architectures entry: the loader names the class, and the adapter lookup reports it
    return None if names[0] in ARCHS else str(names[0])


def check_steps(cfg: Recipe, name: str) -> None:
    for index, step in enumerate(cfg.steps):
        if not isinstance(step, QuantizeStep) or step.quantize.activation_aware:
            raise InputError(
                f"steps.{index}: {name} has no adapter (compress.adapters.ARCHS); only quantize steps without "
                "calibration (method: rtn, type_choice without statistics) run on it"
            )


def run_unadapted(cfg: Recipe, name: str) -> Any:
    """``compress.run`` for an architecture without an adapter: load, quantize every decoder ``nn.Linear`` through
    :mod:`compress.api`, evaluate (when asked) and save with provenance and card."""
    import compress.api as api
    from compress.eval_cache import cached_evaluation
    from compress.loading import load_model
    from compress.pipeline import RunResult, evaluate_against

    check_steps(cfg, name)
    log.info("%s has no adapter: quantize-only through the generic path (every decoder nn.Linear)", name)
    torch.manual_seed(cfg.seed)
    dtype: Any = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    loaded = load_model(cfg.model, dtype=dtype, device=cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    ev = cfg.evaluation
    dense = None
    if ev is not None and ev.dense_baseline:
        dense = cached_evaluation(model, tokenizer, ev.perplexity_texts(), ev.lm_eval, cfg.seed)
    for step in cfg.steps:
        assert isinstance(step, QuantizeStep)
        api.quantize(model, tokenizer, step.quantize, seed=cfg.seed)
    evaluation = evaluate_against(model, tokenizer, ev, dense, cfg.seed) if ev is not None else None
    out = api.save(model, tokenizer, cfg.output.dir, base_model=cfg.model, overwrite=cfg.output.overwrite,
                   evaluation=evaluation, push_to_hub=cfg.output.push_to_hub)  # fmt: skip
    report = json.loads((out / "secateurs.json").read_text())
    return RunResult(model, tokenizer, out, report)
