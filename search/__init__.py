"""Search driver: genetic (NSGA-II/III) and Bayesian (TPE, GP) multi-objective search over compression recipes.

A search recipe is an ordinary recipe plus a ``search:`` block (:mod:`search.config`): the space
(:mod:`search.space`), the objectives and constraints (:mod:`search.objectives`), the sampler
(:mod:`search.samplers`) and seeds (:mod:`search.seeds`). :mod:`search.driver` runs an optuna study whose
trials overlay the base recipe and measure it with one loaded ``compress.session.Session``; :mod:`search.report`
writes the Pareto front and every trial; :mod:`search.materialize` turns chosen trials into checkpoints.

>>> from search.cli import main
>>> main(["recipes/smollm2-search-nsga2.yaml", "--trials", "40"])  # doctest: +SKIP
"""
