"""Seeded evolutionary search that maximises a proxy inside a parameter window (ALGORITHMS.md §2).

Each generation keeps the ``elites`` best candidates and fills the population with children: two parents by
tournament (size 3), crossover with probability ``p_crossover`` (else a copy of the first parent), then mutation
(per-layer probability ``p_mutation``), then repair into the window. Scores are cached by candidate, so a
candidate is scored once. Pure apart from ``score``: the same seed, seeds and score function give the same
result.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from compress.nas.space import Candidate, SpaceSpec, crossover, mutate, random_candidate


@dataclass(frozen=True)
class EvolutionConfig:
    ratio: float = 0.8
    tolerance: float = 0.01
    population: int = 16
    generations: int = 8
    elites: int = 4
    p_crossover: float = 0.7
    p_mutation: float = 0.2
    seed: int = 0


@dataclass
class EvolutionResult:
    best: Candidate
    best_score: float
    scores: dict[Candidate, float] = field(default_factory=dict)  # every candidate scored, in order
    history: list[float] = field(default_factory=list)  # best score after each generation


def evolve(
    spec: SpaceSpec,
    score: Callable[[Candidate], float],
    cfg: EvolutionConfig,
    seeds: list[Candidate] | None = None,
    on_generation: Callable[[int, float], None] | None = None,
) -> EvolutionResult:
    """Maximise ``score`` over candidates with cfg.ratio ± cfg.tolerance of the dense prunable parameters."""
    rng = random.Random(cfg.seed)
    lo, hi = spec.window(cfg.ratio, cfg.tolerance)
    scores: dict[Candidate, float] = {}

    def scored(cand: Candidate) -> float:
        if cand not in scores:
            spec.check(cand)
            scores[cand] = score(cand)
        return scores[cand]

    population = [s for s in (seeds or []) if lo <= spec.params(s) <= hi][: cfg.population]
    while len(population) < cfg.population:
        population.append(random_candidate(spec, rng, cfg.ratio, lo, hi))
    history = []
    for generation in range(cfg.generations):
        ranked = sorted(population, key=lambda c: (-scored(c), c.key()))
        history.append(scored(ranked[0]))
        if on_generation is not None:
            on_generation(generation, history[-1])
        if generation == cfg.generations - 1:
            break
        children = ranked[: cfg.elites]
        seen = set(children)
        attempts = 0
        while len(children) < cfg.population and attempts < 20 * cfg.population:
            attempts += 1
            a = max(rng.sample(ranked, min(3, len(ranked))), key=lambda c: (scored(c), c.key()))
            b = max(rng.sample(ranked, min(3, len(ranked))), key=lambda c: (scored(c), c.key()))
            child = crossover(spec, a, b, rng, lo, hi) if rng.random() < cfg.p_crossover else a
            child = mutate(spec, child, rng, cfg.p_mutation, lo, hi)
            if child not in seen:
                seen.add(child)
                children.append(child)
        population = children
    best = max(scores, key=lambda c: (scores[c], c.key()))
    return EvolutionResult(best, scores[best], scores, history)
