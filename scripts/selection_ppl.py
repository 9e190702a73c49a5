"""Measure any recipe's steps with a search recipe's selection protocol (its ``search.perplexity``), e.g. to put a
reference point such as FLAP-20 next to a search's Pareto front:

    python scripts/selection_ppl.py recipes/smollm2-flap-20.yaml recipes/smollm2-search-nsga2.yaml
"""

from __future__ import annotations

import argparse

from compress.pipeline import as_recipe
from compress.session import Session
from search.config import load_search_recipe
from search.trial import selection_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="the recipe whose steps are measured")
    parser.add_argument("search_recipe", help="the search recipe whose model, calibration and protocol are used")
    parser.add_argument("--metrics", nargs="+", default=["ppl", "prunable_params", "params"])
    args = parser.parse_args()
    search = load_search_recipe(args.search_recipe)
    session = Session.open(search.base)
    recipe = selection_recipe(as_recipe(args.recipe), search.search.perplexity)
    for name, value in session.measure(recipe, args.metrics).items():
        print(f"{name} {value:,.4f}")


if __name__ == "__main__":
    main()
