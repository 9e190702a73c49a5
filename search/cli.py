"""``secateurs search RECIPE``: run or continue a study, then write the report (and chosen checkpoints).

Several workers share one study when they use the same ``--storage`` URL and study name; each is this same
command. Exit codes: 0 done, 1 trials kept failing, 2 bad input (recipe, storage URL, study name).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from quant.errors import InputError
from search.config import load_search_recipe
from search.driver import SearchFailed, SessionFactory, open_session, run_search
from search.materialize import Runner, choose, materialize
from search.report import write_report
from search.storage import open_storage

log = logging.getLogger("secateurs")


def _numbers(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated trial numbers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateurs search",
        description="Multi-objective search over compression recipes (the recipe's search: block).",
    )
    parser.add_argument("recipe", help="a recipe YAML file with a search: block")
    parser.add_argument("--storage", help="optuna storage URL (default: sqlite:///<output.dir>/search.db)")
    parser.add_argument("--study", help="study name (default: search.study or the recipe file's stem)")
    parser.add_argument("--trials", type=int, help="total finished trials wanted (default: search.trials)")
    parser.add_argument("--worker", type=int, help="worker number, varies the sampler seed (default: automatic)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe field, e.g. --set search.sampler.name=tpe (repeatable)",
    )
    parser.add_argument("--out", help="folder for the report and checkpoints (default: output.dir)")
    parser.add_argument("--report-only", action="store_true", help="run no trials; report the stored study")
    parser.add_argument(
        "--materialize", type=int, help="write this many Pareto trials as checkpoints (default: search.materialize)"
    )
    parser.add_argument(
        "--materialize-trials",
        type=_numbers,
        help="comma-separated trial numbers to write as full checkpoints instead",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def search_main(
    args: argparse.Namespace, session_factory: SessionFactory = open_session, runner: Runner | None = None
) -> int:
    # --out is the output folder of everything, the default study database included (never the recipe's output.dir)
    out_override = [f"output.dir={json.dumps(args.out)}"] if args.out else []
    recipe = load_search_recipe(args.recipe, [*args.overrides, *out_override])
    if args.study:
        recipe.search.study = args.study
    if args.trials is not None and args.trials < 0:
        raise InputError(f"--trials: expected a number ≥ 0, got {args.trials}")
    out_dir = Path(args.out) if args.out else recipe.output_dir
    if args.report_only:
        import optuna

        url = args.storage or recipe.storage_url
        try:
            study = optuna.load_study(study_name=recipe.study_name, storage=open_storage(url, recipe.search.heartbeat))
        except KeyError:
            raise InputError(f"no study {recipe.study_name!r} in {url}") from None
    else:
        study = run_search(
            recipe, storage=args.storage, trials=args.trials, worker=args.worker, session_factory=session_factory
        )
    paths = write_report(study, out_dir)
    print(paths["pareto.md"].read_text(), end="")
    log.info("report: %s", ", ".join(str(p) for p in paths.values()))
    numbers = args.materialize_trials
    count = args.materialize if args.materialize is not None else recipe.search.materialize
    shared = not (args.storage or recipe.storage_url).startswith("sqlite")
    if shared and args.materialize is None and not numbers and count:
        # every worker of a shared study reaches this point; checkpoints are written once, on request
        log.info(
            "materialize: skipped by the workers of a shared study; when all are done, run once: "
            "secateurs search %s --storage URL --report-only --materialize %d", args.recipe, count,
        )  # fmt: skip
        count = 0
    chosen = choose(study, count, numbers)
    if chosen:
        materialize(study, recipe, chosen, out_dir, runner)
        log.info("materialized trials %s: %s", [t.number for t in chosen], out_dir / "materialized.md")
    return 0


def main(
    argv: list[str] | None = None, session_factory: SessionFactory = open_session, runner: Runner | None = None
) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="secateurs: %(message)s")
    try:
        return search_main(args, session_factory, runner)
    except InputError as err:
        print(f"secateurs: error: {err}", file=sys.stderr)
        return 2
    except SearchFailed as err:
        print(f"secateurs: search stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
