"""The ``secateurs`` command line: run a recipe, evaluate a model, show a model's structure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from quant.errors import InputError

log = logging.getLogger("secateurs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateurs", description="Compress Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"secateurs {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a YAML recipe end to end")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe field, e.g. --set steps.0.prune.ratio=0.3 (repeatable)",
    )
    run.add_argument("--out", help="output directory (overrides output.dir)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing output checkpoint (or empty folder); nothing else"
    )
    _task_code_flag(run)
    ev = sub.add_parser("eval", help="evaluate a model directory, GGUF file, Hub id or 'default'")
    ev.add_argument("model")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks (default: the shipped offline tasks)")
    ev.add_argument("--limit", type=int, help="lm-eval examples per task")
    ev.add_argument("--ppl-windows", type=int, default=64, help="held-out perplexity windows (0 = skip)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--num_fewshot", "--num-fewshot", type=int, help="lm-eval few-shot examples (default: the task's)")
    ev.add_argument("--batch_size", "--batch-size", type=_batch_size, help="lm-eval batch size: an integer or 'auto'")
    ev.add_argument("--output_path", "--output-path", help="also write the results JSON here (a file, or a folder)")
    ev.add_argument(
        "--apply_chat_template", "--apply-chat-template", action="store_true", help="lm-eval: use the chat template"
    )
    _task_code_flag(ev)
    _verify_flag(ev)
    info = sub.add_parser("info", help="per-layer shapes, parameters and bytes of a model")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    _verify_flag(info)
    export = sub.add_parser("export", help="export a checkpoint: GGUF for llama.cpp, or dequantized HF (--to hf)")
    export.add_argument("model", help="checkpoint directory")
    export.add_argument("--to", choices=["gguf", "hf"], required=True)
    export.add_argument("--type", default="f16", help="GGUF tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0")
    export.add_argument("--out", help="output file (gguf: DIR.TYPE.gguf) or directory (hf: DIR-dequantized)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sub.add_parser("search", help="multi-objective search over recipes (secateurs search -h for its options)")
    return parser


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")


def _write_results(output_path: str, result: dict[str, Any]) -> Path:
    """``output_path`` names a .json file, or a folder that gets ``results.json`` (made when missing)."""
    path = Path(output_path)
    if path.suffix != ".json":
        path = path / "results.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        raise InputError(f"--output_path {output_path!r} cannot be written: {err.strerror or err}") from None
    return path


def _task_code_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-task-code",
        action="append",
        default=[],
        metavar="DIR",
        help="RUNS CODE: make the lm-eval task YAMLs in DIR available; their !function entries import Python from "
        "DIR (a recipe can only name tasks; it never runs code by itself)",
    )


def _verify_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-verify-hashes",
        action="store_true",
        help="skip the sha256 check of every tensor against secateurs.json (names, shapes, dtypes still checked)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("secateurs")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_run(args: argparse.Namespace) -> int:
    from compress.lm_tasks import trust_task_code
    from compress.pipeline import run

    for folder in args.trust_task_code:
        trust_task_code(folder)
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output.dir={json.dumps(args.out)}")  # a quoted YAML string, whatever the path holds
    if args.overwrite:
        overrides.append("output.overwrite=true")
    result = run(args.recipe, overrides)
    for row in result.report.get("evaluation", {}).get("rows", []):
        print(
            f"{row['metric']:40s} dense={row.get('dense', '-')!s:>10} compressed={row['compressed']!s:>10} "
            f"recovery={row.get('recovery', '-')}"
        )
    sizes = result.report["sizes"]
    print(
        f"parameters: {sizes['params_before']:,} -> {sizes['params_after']:,}; checkpoint: {result.checkpoint}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from compress.errors import one_line
    from compress.evaluate import LmEvalOptions, evaluate_model
    from compress.lm_tasks import resolve_tasks, trust_task_code
    from compress.loading import load_model
    from compress.recipe import LmEvalConfig, PerplexityConfig

    for folder in args.trust_task_code:
        trust_task_code(folder)
    try:
        ppl = PerplexityConfig(max_windows=args.ppl_windows) if args.ppl_windows else None
        lm = (
            LmEvalConfig(limit=args.limit)
            if args.tasks is None
            else LmEvalConfig(tasks=[t for t in args.tasks.split(",") if t], limit=args.limit)
        )
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"secateurs eval: {where}: {one_line(first['msg']).removeprefix('Value error, ')}") from None
    resolve_tasks(lm.tasks, "--tasks")
    loaded = load_model(args.model, verify_hashes=not args.no_verify_hashes)
    options = LmEvalOptions(args.num_fewshot, args.batch_size, args.apply_chat_template)
    result = evaluate_model(loaded.model, loaded.tokenizer, ppl, lm, args.seed, options)
    result["model"] = args.model
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.output_path:
        log.info("results written to %s", _write_results(args.output_path, result))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from compress.info import describe, format_description
    from compress.loading import load_model

    loaded = load_model(args.model, verify_hashes=not args.no_verify_hashes)
    description = describe(loaded.model, Path(loaded.path) if loaded.path else None)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if args.to == "hf":
        from compress.export.hf import export_hf

        print(f"wrote {export_hf(Path(args.model), out, args.overwrite)}")
        return 0
    from compress.export.gguf_writer import export_gguf

    summary = export_gguf(Path(args.model), out, args.type, args.overwrite)
    counts = {(layer["n_head"], layer["n_kv"], layer["n_ff"]) for layer in summary["layers"]}
    print(
        f"wrote {summary['file']}: llama.cpp architecture {summary['architecture']!r}, {len(summary['layers'])} layers "
        f"({len(counts)} distinct head/KV/FFN shapes), type {summary['type']}, {len(summary['tensor_types'])} tensors"
    )
    return 0


def _first_word(argv: list[str]) -> int:
    """Index of the first argument that is not an option (the subcommand)."""
    return next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = [a for a in argv[: _first_word(argv)] if a in ("-v", "--verbose")]
    if argv[len(flags) : len(flags) + 1] == ["search"]:
        # the search driver has its own parser (global -v passed on); imported lazily (it needs optuna)
        from search.cli import main as search_main

        return search_main(argv[len(flags) + 1 :] + flags[:1])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="secateurs: %(message)s"
    )
    handlers: dict[str, Any] = {"run": cmd_run, "eval": cmd_eval, "info": cmd_info, "export": cmd_export}
    try:
        return int(handlers[args.command](args))
    except InputError as err:
        print(f"secateurs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
