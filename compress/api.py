"""Model in, model out: compress an ``nn.Module`` you already hold (the shape of llm-compressor's ``oneshot`` and
torchao's ``quantize_``), then save it as a checkpoint with provenance and a Hub card.

>>> model = AutoModelForCausalLM.from_pretrained(path)                 # doctest: +SKIP
>>> compress.prune(model, tokenizer, {"method": "flap", "ratio": 0.2})  # doctest: +SKIP
>>> compress.quantize(model, tokenizer, {"dtypes": "bitmod4"})         # doctest: +SKIP
>>> compress.save(model, tokenizer, "out/model", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP

Each call validates its config with the recipe's pydantic models (a typo is an error naming the field), runs the
step handler of ``compress.steps.HANDLERS`` (the same code ``compress.run`` uses for recipes) and records what it
did on the model, so that :func:`save` writes the same provenance as a recipe run. Quantization without activation
statistics also works for architectures missing from the adapter table, as long as the targets are ``nn.Linear``
inside the decoder's layer list (OPT, GPT-NeoX, Phi, ...).
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from compress.adapters import ARCHS, arch_for, set_submodule
from compress.card import model_card, push_to_hub
from compress.checkpoint import PROVENANCE_FILE, prepare_output, quantization_config, tensor_sha256, write_checkpoint
from compress.corpus import calibration_batches, corpus_fingerprint
from compress.prune.pruner import count_parameters, prunable_parameters
from compress.quantize import module_settings, quant_linears, weight_storage
from compress.recipe import CalibrationConfig, DistillStep, QuantizeStep, Step
from compress.report import report_markdown
from compress.steps import StepContext, apply_step
from quant.errors import InputError
from quant.quantize import quantize_linear

log = logging.getLogger("secateurs")

Calibration = Tensor | str | CalibrationConfig | dict[str, Any] | None
_HISTORY: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()
_STEP = TypeAdapter(Step)


def history(model: nn.Module) -> dict[str, Any]:
    """What the API did to ``model`` so far: {"steps": [{kind: config}], "records": [...], "sizes", "calibration"}."""
    if model not in _HISTORY:
        _HISTORY[model] = {"steps": [], "records": [], "sizes": _sizes(model, "before")}
    return _HISTORY[model]


def _sizes(model: nn.Module, when: str) -> dict[str, int]:
    """Parameters, and prunable decoder parameters where the architecture has an adapter."""
    sizes = {f"params_{when}": count_parameters(model)}
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    if names[0] in ARCHS:
        sizes[f"prunable_{when}"] = prunable_parameters(model, ARCHS[names[0]])
    return sizes


def _parse_step(kind: str, config: Any) -> Any:
    if hasattr(config, "model_dump"):
        config = config.model_dump()
    try:
        return _STEP.validate_python({kind: dict(config or {})})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"][2:]) or kind  # loc = (tag, kind, field...)
        raise InputError(f"compress.{kind}: field '{where}': {first['msg']}") from None


def calibration_ids(tokenizer: Any, calibration: Calibration, seed: int) -> tuple[Tensor, dict[str, Any]]:
    """Token ids [n_samples, seq_len] from a tensor, a corpus source ("web:calibration", a file, ...), a
    CalibrationConfig or its dict; plus the record saved in the provenance."""
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise InputError(f"calibration: expected token ids [n_samples, seq_len] (long), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")  # fmt: skip
        return calibration, {"data": "tensor", "tokens_sha256": tensor_sha256(calibration)}
    if isinstance(calibration, str):
        cfg = CalibrationConfig(data=calibration)
    elif isinstance(calibration, dict):
        cfg = CalibrationConfig(**calibration)
    else:
        cfg = calibration or CalibrationConfig()
    ids = calibration_batches(tokenizer, cfg.data, cfg.samples, cfg.seq_len, seed)
    record = {**cfg.model_dump(mode="json"), "corpus_sha256": corpus_fingerprint(cfg.data)}
    return ids, {**record, "tokens_sha256": tensor_sha256(ids)}


def _needs_calibration(step: Any) -> bool:
    if isinstance(step, DistillStep):  # draws its own training windows from distill.data
        return False
    return not isinstance(step, QuantizeStep) or step.quantize.activation_aware


def apply(
    model: nn.Module,
    tokenizer: Any,
    kind: str,
    config: Any = None,
    calibration: Calibration = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    source: str | None = None,
) -> nn.Module:
    """Apply one step of ``kind`` ("prune", "nas", "quantize", "distill", any kind of ``compress.steps.HANDLERS``)
    in place; ``source`` names the dense parent (a model folder, Hub id or "default") for steps that need it."""
    step = _parse_step(kind, config)
    record = history(model)
    torch.manual_seed(seed)
    ids, cal_record = calibration_ids(tokenizer, calibration, seed) if _needs_calibration(step) else (None, None)
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    if names[0] not in ARCHS and isinstance(step, QuantizeStep) and not step.quantize.activation_aware:
        result = quantize_generic(model, step.quantize)
    else:
        arch = arch_for(model.config)
        data = cal_record["data"] if cal_record else "web:calibration"
        ctx = StepContext(model, tokenizer, arch, ids, batch_size, device, seed, data, source=source)
        result = apply_step(step, ctx)
    record["steps"].append(step.model_dump(mode="json"))
    record["records"].append(result)
    if cal_record:
        record["calibration"] = cal_record
    record["seed"] = seed
    log.info("%s: %s", kind, result.get("summary", "done"))
    return model


def prune(
    model: nn.Module, tokenizer: Any, config: Any = None, calibration: Calibration = None, **kw: Any
) -> nn.Module:
    """Structured pruning in place (``config``: a :class:`compress.recipe.PruneConfig` or its dict)."""
    return apply(model, tokenizer, "prune", config, calibration, **kw)


def quantize(
    model: nn.Module, tokenizer: Any, config: Any = None, calibration: Calibration = None, **kw: Any
) -> nn.Module:
    """Packed quantization in place (``config``: a :class:`compress.recipe.QuantizeConfig` or its dict); calibration
    is drawn only for ``activation_aware``."""
    return apply(model, tokenizer, "quantize", config, calibration, **kw)


def recover(model: nn.Module, tokenizer: Any, config: Any = None, *, teacher: str, **kw: Any) -> nn.Module:
    """Recovery after pruning, in place: blockwise local distillation (then optional global KD) against the dense
    parent ``teacher`` (a model folder, Hub id or "default"; loaded again), ``config`` a ``DistillConfig``."""
    return apply(model, tokenizer, "distill", config, None, source=teacher, **kw)


def decoder_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list of any causal LM: the ModuleList of ``config.num_hidden_layers`` same-class
    blocks (the largest such list when the config does not say)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
        and (n_layers is None or len(m) == n_layers)
    ]  # fmt: skip
    if not found:
        raise InputError(f"{type(model).__name__}: no decoder layer list found (config.num_hidden_layers={n_layers})")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def quantize_generic(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """Weight-only quantization of the ``nn.Linear`` modules (matching ``cfg.modules``) inside the decoder layers of
    an architecture without an adapter; embeddings and head stay as they are."""
    prefix, layers = decoder_layer_list(model)
    modules: dict[str, str] = {}
    for index, layer in enumerate(layers):
        for path, linear in list(layer.named_modules()):
            if not isinstance(linear, nn.Linear) or not re.search(cfg.modules, path):
                continue
            full = f"{prefix}.{index}.{path}"
            dtypes, group_size = module_settings(cfg, full)
            set_submodule(layer, path, quantize_linear(linear, dtypes, group_size, cfg.shrink_factors, None))
            modules[full] = dtypes
    if not modules:
        raise InputError(f"quantize.modules {cfg.modules!r}: no nn.Linear in {prefix} matches")
    storage = weight_storage(model)
    return {
        "config": cfg.model_dump(mode="json"),
        "modules": modules,
        **storage,
        "summary": f"quantize {cfg.dtypes} g{cfg.group_size} ({storage['bits_per_weight']:.3f} bits/weight)",
    }


def _provenance(
    model: nn.Module, base_model: str, out_dir: Path, evaluation: dict[str, Any] | None
) -> dict[str, Any]:
    done = history(model)
    calibration = done.get("calibration")
    sizes: dict[str, Any] = {**done["sizes"], **_sizes(model, "after")}
    if "prunable_before" in sizes:
        sizes["removed_prunable_fraction"] = 1 - sizes["prunable_after"] / sizes["prunable_before"]
    return {
        "recipe": {
            "model": base_model,
            "seed": done.get("seed", 0),
            "steps": done["steps"],
            "output": {"dir": str(out_dir)},
        },
        "base_model": base_model,
        "seed": done.get("seed", 0),
        "calibration": calibration,
        "steps": done["records"],
        "steps_summary": [r.get("summary", "") for r in done["records"]],
        "sizes": sizes,
        "evaluation": evaluation or {},
    }


def save(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    export: str = "packed",
    evaluation: dict[str, Any] | None = None,
    push_to_hub: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write ``model`` as a Secateurs checkpoint (atomic; reload-checked) with provenance and a Hub card.

    ``base_model``: the Hub id the card names (default: ``model.config._name_or_path``; ``"default"`` is the
    default model). ``evaluation``: a ``compress.pipeline.evaluate_against`` result to record. ``push_to_hub``:
    a repository id, uploaded with ``private``/``token``/``revision``.
    """
    out = Path(out_dir)
    prepare_output(out, overwrite)
    base = base_model or str(getattr(model.config, "_name_or_path", "") or "unknown")
    provenance = _provenance(model, base, out, evaluation)
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    if names[0] in ARCHS:
        from compress.pipeline import reload_logit_difference

        probe = tokenizer("Secateurs keeps what matters.", return_tensors="pt").input_ids
        report: dict[str, Any] = dict(provenance)

        def verify(folder: Path) -> dict[str, str]:
            report["reload_max_abs_logit_diff"] = reload_logit_difference(model, folder, probe)
            text = json.dumps(report, indent=2, sort_keys=True) + "\n"
            return {"report.json": text, "report.md": report_markdown(report)}

        write_checkpoint(model, tokenizer, arch_for(model.config), out, provenance, overwrite, verify, export)
    else:
        save_plain(model, tokenizer, out, provenance)
    if push_to_hub:
        push_to_hub_(out, push_to_hub, private=private, token=token, revision=revision)
    return out


push_to_hub_ = push_to_hub  # the module-level function; ``save``'s argument of the same name shadows it


def save_plain(model: nn.Module, tokenizer: Any, out: Path, provenance: dict[str, Any]) -> Path:
    """Unchanged shapes (quantize-only, no adapter): ``save_pretrained`` + ``quantization_config`` + provenance +
    card; ``import quant`` registers the loader, so plain ``AutoModelForCausalLM.from_pretrained`` reads it back."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        if quant_linears(model):
            config["quantization_config"] = quantization_config(model)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(provenance))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
