"""TraceNAS-style training-free search over depth and width (ALGORITHMS.md §2).

- ``space``: candidates (per-layer kept KV groups and MLP channels, 0 = sub-block removed), budgets, operators.
- ``rank``: Pearson / Spearman / Kendall (pure math).
- ``proxy``: gradient traces of the dense model's sub-blocks and the proxy Φ of a candidate.
- ``evolve``: the seeded evolutionary search that maximises a proxy inside a parameter window.

Realising and scoring candidates on a model (FLAP scores + surgery, on the shared dense cache) is
``compress.candidates``; the ``nas`` recipe step (glue) is a handler in ``compress.steps``.
"""
