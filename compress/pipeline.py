"""The main job: recipe → model → steps → evaluation → checkpoint (atomic, verified by a reload)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.adapters import arch_for
from compress.checkpoint import load_checkpoint_model, prepare_output, push_to_hub, tensor_sha256, write_checkpoint
from compress.corpus import calibration_batches, corpus_fingerprint, load_documents, mixture_parts
from compress.eval_cache import cached_evaluation
from compress.evaluate import comparison_rows, evaluate_model
from compress.lm_tasks import resolve_tasks
from compress.loading import _load_tokenizer, load_model, resolve_dtype, resolve_source
from compress.metrics import count_parameters, prunable_parameters
from compress.output_dir import clean_leftovers, temp_sibling
from compress.recipe import (
    DistillStep,
    EvaluationConfig,
    PruneStep,
    QuantizeStep,
    Recipe,
    Step,
    apply_overrides,
    load_recipe_dict,
    parse_recipe,
)
from compress.recover.step import distill_windows
from compress.report import report_markdown
from compress.steps import StepContext, apply_step
from compress.stream import not_streamable, open_streamer, stream_folder
from compress.stream.engine import stream_steps
from compress.stream.output import final_logits, reload_logits, save_weights
from compress.verify import verify_checkpoint

log = logging.getLogger("secateurs")


class RunResult:
    """The compressed model, its checkpoint folder and the report. After a streamed run the model was never whole
    in memory: ``model`` loads the written checkpoint on first use."""

    def __init__(self, model: nn.Module | None, tokenizer: Any, checkpoint: Path, report: dict[str, Any]):
        self._model, self.tokenizer, self.checkpoint, self.report = model, tokenizer, checkpoint, report

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = load_model(str(self.checkpoint), dtype="auto").model
        return self._model


def as_recipe(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return parse_recipe(apply_overrides(recipe.model_dump(), overrides or []))
    if isinstance(recipe, dict):
        return parse_recipe(apply_overrides(recipe, overrides or []))
    return parse_recipe(apply_overrides(load_recipe_dict(recipe), overrides or []), origin=str(recipe))


def run(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunResult:
    """Run a recipe end to end and return the compressed model, its checkpoint folder and the report."""
    cfg = as_recipe(recipe, overrides)
    out_dir = Path(cfg.output.dir)
    prepare_output(out_dir, cfg.output.overwrite)
    check_inputs(cfg)  # before any path is chosen: bad input is one line, whichever path would have run
    from compress.generic import run_unadapted, unadapted_architecture  # lazy: it builds on compress.api

    if name := unadapted_architecture(cfg.model):  # no adapter: quantize-only through the generic path
        return run_unadapted(cfg, name)
    clean_leftovers(out_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    torch.manual_seed(cfg.seed)
    resolved = resolve_source(cfg.model)
    dtype = resolve_dtype(cfg.dtype, resolved)
    exports = [step.quantize.export for step in cfg.steps if isinstance(step, QuantizeStep)]
    export = exports[-1] if exports else "packed"
    why = not_streamable(cfg.steps, export) or ("evaluation needs the whole model" if cfg.evaluation else None)
    folder = stream_folder(resolved, cfg.stream, why)
    if folder is not None:
        assert isinstance(dtype, torch.dtype)
        return run_streamed(cfg, folder, dtype, export)
    loaded = load_model(cfg.model, dtype=dtype, device=cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = arch_for(model.config)
    timings["load"] = time.perf_counter() - clock
    sizes: dict[str, Any] = {
        "params_before": count_parameters(model),
        "prunable_before": prunable_parameters(model, arch),
    }
    ev = cfg.evaluation
    dense_eval = None
    if ev is not None and ev.dense_baseline:
        clock = time.perf_counter()
        log.info("evaluating the dense model")
        dense_eval = cached_evaluation(model, tokenizer, ev.perplexity_texts(), ev.lm_eval, cfg.seed)
        timings["evaluate_dense"] = time.perf_counter() - clock

    clock = time.perf_counter()
    calibration = None
    if cfg.steps:
        cal = cfg.calibration
        calibration = calibration_batches(tokenizer, cal.data, cal.samples, cal.seq_len, cfg.seed)
    ctx = StepContext(
        model, tokenizer, arch, calibration, cfg.calibration.batch_size, cfg.device, cfg.seed, cfg.calibration.data,
        source=cfg.model,
    )
    summaries = [apply_step(step, ctx) for step in cfg.steps]
    timings["compress"] = time.perf_counter() - clock
    sizes["params_after"] = count_parameters(model)
    sizes["prunable_after"] = prunable_parameters(model, arch)
    sizes["removed_prunable_fraction"] = 1 - sizes["prunable_after"] / sizes["prunable_before"]

    evaluation: dict[str, Any] = {}
    if ev is not None:
        clock = time.perf_counter()
        log.info("evaluating the compressed model")
        evaluation = evaluate_against(model, tokenizer, ev, dense_eval, cfg.seed)
        timings["evaluate"] = time.perf_counter() - clock
    provenance = build_provenance(cfg, calibration, summaries, sizes, evaluation)
    clock = time.perf_counter()
    probe = calibration[:2] if calibration is not None else tokenizer("Secateurs", return_tensors="pt").input_ids
    report: dict[str, Any] = {**provenance}
    if dense_eval is not None:
        report["dense_baseline_cache"] = dense_eval["cache"]  # report only: secateurs.json stays run-independent

    def verify(folder: Path) -> dict[str, Any]:
        verify_checkpoint(folder, hashes=False)  # names, shapes, dtypes: the hashes were just computed
        report["reload_max_abs_logit_diff"] = reload_logit_difference(model, folder, probe)
        report["timings_seconds"] = {k: round(v, 2) for k, v in timings.items()}
        return {
            "report.json": json.dumps(report, indent=2, sort_keys=True) + "\n",
            "report.md": report_markdown(report),
        }

    write_checkpoint(model, tokenizer, arch, out_dir, provenance, cfg.output.overwrite, verify, export)
    timings["write"] = time.perf_counter() - clock
    log.info("checkpoint written to %s (reload max |Δlogit| = %.2e)", out_dir, report["reload_max_abs_logit_diff"])
    if cfg.output.push_to_hub:
        report["hub_url"] = push_to_hub(out_dir, cfg.output.push_to_hub)
    return RunResult(model, tokenizer, out_dir, report)


def run_streamed(cfg: Recipe, folder: Path, dtype: torch.dtype, export: str) -> RunResult:
    """:func:`run` one decoder layer at a time (``compress.stream``; no evaluation: it needs the whole model)."""
    out_dir = Path(cfg.output.dir)
    clock = time.perf_counter()
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]  # deepest first
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(out_dir)  # a crashed run's staging is a leftover the next run removes
    try:
        streamer = open_streamer(folder, dtype, staging, cfg.device, cfg.model)
        model, arch = streamer.model, streamer.arch
        tokenizer = _load_tokenizer(folder, cfg.model)
        log.info("streaming %s one decoder layer at a time (%s)", folder, str(dtype).removeprefix("torch."))
        timings = {"load": time.perf_counter() - clock}
        sizes: dict[str, Any] = {
            "params_before": count_parameters(model),
            "prunable_before": prunable_parameters(model, arch),
        }
        clock = time.perf_counter()
        cal = cfg.calibration
        calibration = (
            calibration_batches(tokenizer, cal.data, cal.samples, cal.seq_len, cfg.seed) if cfg.steps else None
        )
        probe = calibration[:2] if calibration is not None else tokenizer("Secateurs", return_tensors="pt").input_ids
        windows = [distill_windows(s.distill, tokenizer, cfg.seed) for s in cfg.steps if isinstance(s, DistillStep)]
        records, hidden = stream_steps(streamer, cfg.steps, calibration, cal.batch_size, probe, windows, cfg.seed)
        summaries = []
        for step, record in zip(cfg.steps, records, strict=True):
            if isinstance(step, QuantizeStep):
                storage = streamer.weight_storage()
                record.update(storage, summary=f"quantize {step.quantize.dtypes} g{step.quantize.group_size} "
                              f"({storage['bits_per_weight']:.3f} bits/weight)")  # fmt: skip
            elif isinstance(step, PruneStep):
                record["summary"] = f"{step.prune.method} {step.prune.structure} ratio={step.prune.ratio}"
            summaries.append({**record, "config": step_config(step)})
        timings["compress"] = time.perf_counter() - clock
        sizes["params_after"] = count_parameters(model)
        sizes["prunable_after"] = prunable_parameters(model, arch)
        sizes["removed_prunable_fraction"] = 1 - sizes["prunable_after"] / sizes["prunable_before"]
        provenance = build_provenance(cfg, calibration, summaries, sizes, {})
        report: dict[str, Any] = {
            **provenance,
            "stream": {
                "layer_seconds": [round(t, 2) for t in streamer.seconds],
                "statistics_seconds": [round(t, 2) for t in streamer.statistics_seconds],
            },
        }
        expected = final_logits(model, arch, hidden, streamer.source, dtype)
        clock = time.perf_counter()

        def verify(tmp: Path) -> dict[str, Any]:
            verify_checkpoint(tmp, hashes=False)
            reloaded = reload_logits(tmp, arch, probe, cal.batch_size)
            report["reload_max_abs_logit_diff"] = float((expected - reloaded).abs().max())
            report["timings_seconds"] = {k: round(v, 2) for k, v in timings.items()}
            return {
                "report.json": json.dumps(report, indent=2, sort_keys=True) + "\n",
                "report.md": report_markdown(report),
            }

        write_checkpoint(
            model, tokenizer, arch, out_dir, provenance, cfg.output.overwrite, verify, export,
            save_weights(streamer), streamer.quantization_config(),
        )  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created if not out_dir.exists() else []:  # a failed run leaves no folders it made
            try:
                parent.rmdir()
            except OSError:
                break
    log.info("checkpoint written to %s (reload max |Δlogit| = %.2e)", out_dir, report["reload_max_abs_logit_diff"])
    if cfg.output.push_to_hub:
        report["hub_url"] = push_to_hub(out_dir, cfg.output.push_to_hub)
    return RunResult(None, tokenizer, out_dir, report)


def step_config(step: Step) -> dict[str, Any]:
    """The provenance ``config`` of a step (its inner config, as the step handlers record it)."""
    for kind, name in ((PruneStep, "prune"), (QuantizeStep, "quantize"), (DistillStep, "distill")):
        if isinstance(step, kind):
            return dict(getattr(step, name).model_dump(mode="json"))
    return {}


def evaluate_against(
    model: nn.Module, tokenizer: Any, ev: EvaluationConfig, dense_eval: dict[str, Any] | None, seed: int
) -> dict[str, Any]:
    """Evaluate the compressed model and compare with the dense results (recovery per metric)."""
    result = evaluate_model(model, tokenizer, ev.perplexity_texts(), ev.lm_eval, seed)
    dense_metrics = dense_eval["metrics"] if dense_eval else None
    dense_stderr = dense_eval.get("stderr") if dense_eval else None
    return {
        "compressed": result["metrics"],
        "dense": dense_metrics,
        "compressed_stderr": result.get("stderr", {}),
        "dense_stderr": dense_stderr,
        "rows": comparison_rows(dense_metrics, result["metrics"], dense_stderr, result.get("stderr")),
        "protocol": result["protocol"],
    }


def build_provenance(
    cfg: Recipe,
    calibration: torch.Tensor | None,
    summaries: list[dict[str, Any]],
    sizes: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """What ``secateurs.json`` records: enough to reproduce the run and to judge its result."""
    return {
        "recipe": cfg.model_dump(mode="json"),
        "base_model": cfg.model,
        "seed": cfg.seed,
        "calibration": {
            **cfg.calibration.model_dump(mode="json"),
            "corpus_sha256": corpus_fingerprint(cfg.calibration.data) if calibration is not None else None,
            "tokens_sha256": tensor_sha256(calibration) if calibration is not None else None,
        },
        "steps": summaries,
        "steps_summary": [s["summary"] for s in summaries],
        "sizes": sizes,
        "evaluation": evaluation,
    }


def check_inputs(cfg: Recipe) -> None:
    """Fail on a missing model, unreadable data files or unknown lm-eval tasks before any expensive work
    (loading, evaluation, calibration). Cheap checks first: resolving the model may convert a GGUF file."""
    if cfg.evaluation is not None and cfg.evaluation.lm_eval is not None:
        resolve_tasks(cfg.evaluation.lm_eval.tasks)
    training = [s.distill.data for s in cfg.steps if isinstance(s, DistillStep)]
    for data in [cfg.calibration.data, *training] if cfg.steps else []:  # a mixture: part by part
        for source, _ in mixture_parts(data) or ((data, 1.0),):
            load_documents(source)
    if cfg.evaluation is not None and cfg.evaluation.perplexity is not None:
        for text in [cfg.evaluation.perplexity, *cfg.evaluation.more_perplexity]:
            load_documents(text.data)
    resolve_source(cfg.model)


@torch.no_grad()
def reload_logit_difference(model: nn.Module, folder: Path, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between the in-memory model and a fresh load of ``folder`` on ``input_ids``."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    reloaded = load_checkpoint_model(folder, dtype=dtype).to(device).eval()
    a = model(input_ids=input_ids.to(device), use_cache=False).logits
    b = reloaded(input_ids=input_ids.to(device), use_cache=False).logits
    return float((a - b).abs().max())
