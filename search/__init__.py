"""Search driver (genetic and Bayesian multi-objective search with optuna) — not implemented yet (issue 6)."""
