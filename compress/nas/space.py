"""The TraceNAS candidate space: per-layer widths and sub-block removal (pure functions, no model).

A candidate keeps, in every decoder layer l, ``attn[l]`` whole KV groups (each with its g query heads; 0 removes
the attention sub-block) and ``mlp[l]`` MLP channels, a multiple of ``mlp_step`` or the full width F (0 removes
the MLP sub-block). Which groups and channels are kept is decided when the candidate is realised, by the same FLAP
scores as the prune step (WIFV fluctuation of the o_proj / down_proj inputs, dense statistics), with FLAP's bias
compensation — so a candidate is a pure shape and its cost is known exactly before any gradient work.

Operators follow ALGORITHMS.md §2: blend crossover of keep ratios, multiplicative mutation of MLP widths and ± one
KV group, depth changes (removing or restoring a sub-block) only in layers ≥ ``skip_from`` (the later half by
default; never layer 0's attention, whose KV cache defines the cached length). Every operator ends with
:func:`repair`, which moves widths one step at a time until the parameter count is inside the window.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from compress.prune.allocate import mlp_widths, snap_width


@dataclass(frozen=True)
class SpaceSpec:
    """Shape of the space for one dense model (uniform dense layers).

    Cost model (exactly what :func:`compress.prune.pruner.prunable_parameters` counts after surgery): one KV group
    costs hidden·d_h·(2g + 2) weights (+ (g + 2)·d_h biases when q/k/v have biases, Qwen2), one MLP channel
    3·hidden; a partly pruned sub-block gains an output bias of ``hidden`` from bias compensation.
    """

    n_layers: int
    n_kv: int
    group: int
    head_dim: int
    hidden: int
    intermediate: int
    mlp_step: int = 32
    skip_from: int | None = None
    allow_skip: bool = True
    qkv_bias: bool = False
    out_bias: bool = False  # o_proj / down_proj already carry biases in the dense model
    compensation: bool = True

    @property
    def first_skip(self) -> int:
        """First layer whose sub-blocks may be removed."""
        return max(1, self.n_layers // 2 if self.skip_from is None else self.skip_from)

    @property
    def attn_unit(self) -> int:
        bias = (self.group + 2) * self.head_dim if self.qkv_bias else 0
        return self.hidden * self.head_dim * (2 * self.group + 2) + bias

    @property
    def mlp_unit(self) -> int:
        return 3 * self.hidden

    def mlp_widths(self) -> list[int]:
        """Allowed MLP widths of a present sub-block: multiples of the step, and F."""
        return mlp_widths(self.intermediate, self.mlp_step)

    def dense_params(self) -> int:
        return self.params(Candidate((self.n_kv,) * self.n_layers, (self.intermediate,) * self.n_layers))

    def params(self, cand: Candidate) -> int:
        """Prunable decoder parameters of ``cand`` (weights and biases of the attention and MLP linears)."""
        total = 0
        out_bias = self.hidden if self.out_bias else 0
        for k, c in zip(cand.attn, cand.mlp, strict=True):
            if k:
                compensated = self.compensation and k < self.n_kv and not self.out_bias
                total += k * self.attn_unit + (self.hidden if compensated else out_bias)
            if c:
                compensated = self.compensation and c < self.intermediate and not self.out_bias
                total += c * self.mlp_unit + (self.hidden if compensated else out_bias)
        return total

    def window(self, ratio: float, tolerance: float) -> tuple[int, int]:
        """[lo, hi] parameter window: (ratio ± tolerance) × dense prunable parameters."""
        dense = self.dense_params()
        return math.floor((ratio - tolerance) * dense), math.ceil((ratio + tolerance) * dense)

    def check(self, cand: Candidate) -> None:
        """Raise ValueError naming the layer when ``cand`` is not in the space."""
        if len(cand.attn) != self.n_layers or len(cand.mlp) != self.n_layers:
            raise ValueError(f"candidate has {len(cand.attn)}/{len(cand.mlp)} layers, expected {self.n_layers}")
        allowed = set(self.mlp_widths())
        for layer, (k, c) in enumerate(zip(cand.attn, cand.mlp, strict=True)):
            if not 0 <= k <= self.n_kv:
                raise ValueError(f"layer {layer}: {k} KV groups, expected 0..{self.n_kv}")
            if c != 0 and c not in allowed:
                raise ValueError(f"layer {layer}: MLP width {c} is not a multiple of {self.mlp_step} (or F)")
            removed = (k == 0) or (c == 0)
            if removed and (not self.allow_skip or layer < self.first_skip):
                raise ValueError(f"layer {layer}: sub-blocks may only be removed from layer {self.first_skip} on")


@dataclass(frozen=True)
class Candidate:
    """attn: kept KV groups per layer (0 = attention removed); mlp: kept MLP channels per layer (0 = removed)."""

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    @property
    def n_active(self) -> int:
        """Number of present sub-blocks."""
        return sum(k > 0 for k in self.attn) + sum(c > 0 for c in self.mlp)

    def key(self) -> str:
        return "a" + ".".join(map(str, self.attn)) + "|m" + ".".join(map(str, self.mlp))


def snap_mlp(spec: SpaceSpec, width: float) -> int:
    """The allowed present width nearest to ``width`` (≥ one step)."""
    return snap_width(width, spec.intermediate, spec.mlp_step)


def _step(spec: SpaceSpec, cand: Candidate, rng: random.Random, grow: bool) -> Candidate | None:
    """Change one present sub-block by one unit (an MLP step with probability 0.8, else one KV group)."""
    attn, mlp = list(cand.attn), list(cand.mlp)
    widths = spec.mlp_widths()
    if grow:
        mlp_ok = [i for i, c in enumerate(mlp) if 0 < c < spec.intermediate]
        attn_ok = [i for i, k in enumerate(attn) if 0 < k < spec.n_kv]
    else:
        mlp_ok = [i for i, c in enumerate(mlp) if c > spec.mlp_step]
        attn_ok = [i for i, k in enumerate(attn) if k > 1]
    use_mlp = bool(mlp_ok) and (not attn_ok or rng.random() < 0.8)
    if use_mlp:
        i = rng.choice(mlp_ok)
        j = widths.index(mlp[i])
        mlp[i] = widths[j + 1] if grow else widths[j - 1]
    elif attn_ok:
        i = rng.choice(attn_ok)
        attn[i] += 1 if grow else -1
    elif grow and (0 in attn or 0 in mlp):  # everything present is full: restore a removed sub-block, narrowest
        removed = [("attn", i) for i, k in enumerate(attn) if k == 0] + [
            ("mlp", i) for i, c in enumerate(mlp) if c == 0
        ]
        kind, i = rng.choice(removed)
        if kind == "attn":
            attn[i] = 1
        else:
            mlp[i] = spec.mlp_step if spec.mlp_step < spec.intermediate else spec.intermediate
    else:
        return None
    return Candidate(tuple(attn), tuple(mlp))


def repair(
    spec: SpaceSpec, cand: Candidate, lo: int, hi: int, rng: random.Random, max_steps: int = 100_000
) -> Candidate:
    """Move widths one unit at a time (random present sub-blocks) until lo ≤ params ≤ hi.

    Raises ValueError when the window cannot be reached (e.g. narrower than one unit's cost)."""
    for _ in range(max_steps):
        params = spec.params(cand)
        if lo <= params <= hi:
            return cand
        moved = _step(spec, cand, rng, grow=params < lo)
        if moved is None:
            break
        if (params < lo and spec.params(moved) > hi) or (params > hi and spec.params(moved) < lo):
            # one unit jumps over the window: draw one other unit step and take it if it lands inside
            alt = _step(spec, cand, rng, grow=params < lo)
            moved = alt if alt is not None and lo <= spec.params(alt) <= hi else moved
        cand = moved
    raise ValueError(f"cannot bring the candidate into the parameter window [{lo:,}, {hi:,}]")


def random_candidate(
    spec: SpaceSpec, rng: random.Random, ratio: float, lo: int, hi: int, spread: float = 0.3, p_skip: float = 0.1
) -> Candidate:
    """Per-layer keep ratios ~ U(ratio ± spread) (clipped), sub-blocks of layers ≥ first_skip removed with
    probability ``p_skip`` each, then repaired into [lo, hi]."""
    attn, mlp = [], []
    for layer in range(spec.n_layers):
        may_skip = spec.allow_skip and layer >= spec.first_skip
        fa = min(1.0, max(0.0, ratio + rng.uniform(-spread, spread)))
        fm = min(1.0, max(0.0, ratio + rng.uniform(-spread, spread)))
        attn.append(0 if may_skip and rng.random() < p_skip else max(1, round(fa * spec.n_kv)))
        mlp.append(0 if may_skip and rng.random() < p_skip else snap_mlp(spec, fm * spec.intermediate))
    return repair(spec, Candidate(tuple(attn), tuple(mlp)), lo, hi, rng)


def from_counts(
    spec: SpaceSpec, kv_groups: list[int], channels: list[int], lo: int, hi: int, rng: random.Random
) -> Candidate:
    """A candidate from per-layer unit counts (e.g. FLAP's adaptive allocation): MLP widths snapped, repaired."""
    attn = tuple(
        max(1, k) if layer < spec.first_skip or not spec.allow_skip else k for layer, k in enumerate(kv_groups)
    )
    mlp = tuple(
        0 if c == 0 and spec.allow_skip and layer >= spec.first_skip else snap_mlp(spec, c)
        for layer, c in enumerate(channels)
    )
    return repair(spec, Candidate(attn, mlp), lo, hi, rng)


def mutate(spec: SpaceSpec, cand: Candidate, rng: random.Random, p: float, lo: int, hi: int) -> Candidate:
    """Each layer with probability p: MLP width × exp(N(0, 0.25)) (snapped) or ± one KV group; with probability
    p/4 (layers ≥ first_skip) a sub-block is removed or restored (restored at the candidate's mean width)."""
    attn, mlp = list(cand.attn), list(cand.mlp)
    present_mlp = [c for c in mlp if c] or [spec.intermediate]
    for layer in range(spec.n_layers):
        if rng.random() < p:
            if rng.random() < 0.7 and mlp[layer]:
                mlp[layer] = snap_mlp(spec, mlp[layer] * math.exp(rng.gauss(0.0, 0.25)))
            elif attn[layer]:
                attn[layer] = min(spec.n_kv, max(1, attn[layer] + rng.choice((-1, 1))))
        if spec.allow_skip and layer >= spec.first_skip and rng.random() < p / 4:
            if rng.random() < 0.5:
                attn[layer] = (
                    0 if attn[layer] else max(1, round(sum(cand.attn) / max(1, sum(k > 0 for k in cand.attn))))
                )
            else:
                mlp[layer] = 0 if mlp[layer] else snap_mlp(spec, sum(present_mlp) / len(present_mlp))
    return repair(spec, Candidate(tuple(attn), tuple(mlp)), lo, hi, rng)


def crossover(spec: SpaceSpec, a: Candidate, b: Candidate, rng: random.Random, lo: int, hi: int) -> Candidate:
    """Blend crossover of keep ratios: per layer w = a + u·(b − a), u ~ U(0, 1), snapped; a sub-block removed in
    one parent is removed in the child with probability 1/2 (and otherwise takes the other parent's width)."""
    attn, mlp = [], []
    for ka, kb, ca, cb in zip(a.attn, b.attn, a.mlp, b.mlp, strict=True):
        if (ka == 0) != (kb == 0):
            attn.append(ka if rng.random() < 0.5 else kb)
        else:
            attn.append(round(ka + rng.random() * (kb - ka)))
        if (ca == 0) != (cb == 0):
            mlp.append(ca if rng.random() < 0.5 else cb)
        else:
            mlp.append(0 if ca == 0 else snap_mlp(spec, ca + rng.random() * (cb - ca)))
    return repair(spec, Candidate(tuple(attn), tuple(mlp)), lo, hi, rng)
