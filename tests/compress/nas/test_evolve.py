"""The evolutionary search: deterministic under a seed, respects the window, improves a known objective."""

from compress.nas.evolve import EvolutionConfig, evolve
from compress.nas.space import Candidate, SpaceSpec

SPEC = SpaceSpec(n_layers=8, n_kv=3, group=2, head_dim=8, hidden=48, intermediate=96, mlp_step=16)


def front_loaded(c: Candidate) -> float:
    """A synthetic objective: width in early layers is worth more than width in late ones."""
    return sum((8 - i) * (c.mlp[i] / 96 + c.attn[i] / 3) for i in range(8))


def test_same_seed_same_result_and_other_seed_differs():
    cfg = EvolutionConfig(ratio=0.6, tolerance=0.03, population=8, generations=4, elites=2, seed=3)
    a = evolve(SPEC, front_loaded, cfg)
    b = evolve(SPEC, front_loaded, cfg)
    assert a.best == b.best and list(a.scores) == list(b.scores) and a.history == b.history
    c = evolve(SPEC, front_loaded, EvolutionConfig(**{**vars(cfg), "seed": 4}))
    assert list(c.scores) != list(a.scores)


def test_search_improves_and_stays_in_the_window():
    cfg = EvolutionConfig(ratio=0.6, tolerance=0.03, population=10, generations=8, elites=2, seed=0)
    result = evolve(SPEC, front_loaded, cfg)
    lo, hi = SPEC.window(0.6, 0.03)
    assert all(lo <= SPEC.params(c) <= hi for c in result.scores)
    assert result.history == sorted(result.history)  # elitism: the best never gets worse
    assert result.history[-1] > result.history[0]
    # the optimum moves width to early layers: the best's first half is wider than its second half
    assert sum(result.best.mlp[:4]) > sum(result.best.mlp[4:])


def test_seeds_are_scored_first():
    seed = Candidate((2,) * 8, (64,) * 8)
    lo, hi = SPEC.window(0.6, 0.1)
    assert lo <= SPEC.params(seed) <= hi
    cfg = EvolutionConfig(ratio=0.6, tolerance=0.1, population=4, generations=1, seed=0)
    result = evolve(SPEC, front_loaded, cfg, seeds=[seed])
    assert next(iter(result.scores)) == seed
