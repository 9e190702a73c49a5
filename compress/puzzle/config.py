"""Recipe settings of ``prune: {structure: puzzle, puzzle: {...}}`` (kept here so recipe.py only imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_COUNT = 2**20  # as compress.recipe: larger counts only exhaust memory


class PuzzleConfig(BaseModel):
    """Block library, replace-one-block scoring and the budgets of the integer program.

    The parameter budget is the prune step's ``ratio``: the chosen model has at most
    dense parameters − ratio × prunable decoder parameters (compensation biases and no-op constants included).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    score: Literal["kl", "lm_loss"] = Field("kl", description="KL(parent ‖ variant) or the LM-loss increase")
    estimate: Literal["exact", "local"] = Field(
        "exact",
        description="exact: every variant through the rest of the model; local: the smallest variant of each "
        "sub-block exactly, the others by their local output error scaled to it (cheaper)",
    )
    samples: int = Field(4, ge=1, le=MAX_COUNT, description="scoring sequences (first calibration rows)")
    seq_len: int = Field(128, ge=8, le=MAX_COUNT)
    mlp_steps: int = Field(16, ge=1, le=4096, description="MLP widths on the grid F·j/mlp_steps, j = 1..mlp_steps")
    allow_noop: bool = True
    allow_linear: bool = Field(
        False, description="also a linear replacement of every sub-block (a least-squares map hidden → hidden)"
    )
    repair: Literal["bias", "least_squares"] = Field(
        "bias",
        description="how a narrower attention/MLP variant is realised for scoring: FLAP bias compensation, or a "
        "ridge least-squares refit of its consumer (o_proj / down_proj) to the parent sub-block's output on the fit "
        "windows (the library then scores the blocks as a prune step with reconstruct: least_squares realises them)",
    )
    fit_samples: int = Field(
        32,
        ge=1,
        le=MAX_COUNT,
        description="calibration windows after the scoring ones on which linear replacements (and least-squares "
        "repairs) are fitted (never the scoring tokens: a map fitted on them would be scored in-sample)",
    )
    kv_cache_ratio: float | None = Field(None, gt=0.0, le=1.0, description="max fraction of the dense KV cache")
    latency_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="max fraction of the dense decoder's measured sub-block latency"
    )
    cache_dir: str | None = Field(None, description="where scores are cached (default ~/.cache/secateurs/puzzle)")
    time_limit: float = Field(60.0, gt=0.0, description="MILP time limit in seconds (the gap is reported)")
