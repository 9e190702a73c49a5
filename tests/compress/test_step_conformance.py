"""Conformance suite that every step kind inherits (optuna-style): subclass :class:`StepConformance`, give ``step``
(one recipe step) and the suite checks, through ``secateurs run`` on a tiny model folder:

- seeded determinism: the same recipe and seed write byte-identical weights;
- shapes: the model runs, its logits are [batch, T, vocab], and every kept layer's shapes are what the checkpoint
  config records (``secateurs info`` agrees with the model);
- save → fresh-process reload: a new Python process loads the checkpoint and gives the in-memory logits.

A new step kind adds one subclass here (and its handler in ``compress.steps.HANDLERS``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from compress.info import describe
from compress.pipeline import RunResult, run
from compress.steps import HANDLERS

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(11))


def _recipe(model_dir: Path, out: Path, steps: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    return {
        "model": str(model_dir),
        "seed": seed,
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "steps": steps,
        "output": {"dir": str(out)},
        "evaluation": None,
    }


class StepConformance:
    step: ClassVar[dict[str, Any]]
    before: ClassVar[list[dict[str, Any]]] = []  # steps the kind needs first (e.g. distill after a prune)

    @pytest.fixture(scope="class")
    def runs(self, tiny4_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, RunResult]:
        folder = tmp_path_factory.mktemp(next(iter(self.step)))
        first = run(_recipe(tiny4_dir, folder / "a", [*self.before, self.step]))
        second = run(_recipe(tiny4_dir, folder / "b", [*self.before, self.step]))
        return first, second

    def test_seeded_runs_write_identical_weights(self, runs: tuple[RunResult, RunResult]) -> None:
        a, b = (r.checkpoint / "model.safetensors" for r in runs)
        assert a.read_bytes() == b.read_bytes()

    def test_shapes(self, runs: tuple[RunResult, RunResult]) -> None:
        result = runs[0]
        with torch.no_grad():
            logits = result.model(input_ids=IDS, use_cache=False).logits
        assert logits.shape == (*IDS.shape, 512) and bool(torch.isfinite(logits).all())
        described = describe(result.model, result.checkpoint)
        assert len(described["layers"]) == 4
        assert described["params"] == result.report["sizes"]["params_after"]

    def test_fresh_process_reload_gives_equal_logits(self, runs: tuple[RunResult, RunResult], tmp_path: Path) -> None:
        result = runs[0]
        with torch.no_grad():
            expected = result.model(input_ids=IDS, use_cache=False).logits
        torch.save(IDS, tmp_path / "ids.pt")
        code = (
            "from pathlib import Path\n"
            "import torch\n"
            "from compress.checkpoint import load_checkpoint_model\n"
            f"m = load_checkpoint_model(Path({str(result.checkpoint)!r})).eval()\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(input_ids=ids, use_cache=False).logits, {str(tmp_path / 'got.pt')!r})\n"
        )
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        got = torch.load(tmp_path / "got.pt", weights_only=True)
        assert float((got - expected).abs().max()) <= 1e-5


class TestPrune(StepConformance):
    step = {"prune": {"method": "flap", "ratio": 0.3}}


class TestPruneExplicitCounts(StepConformance):
    step = {"prune": {"attn_groups": [3, 1, 0, 2], "mlp_channels": [96, 40, 0, 32]}}


class TestQuantize(StepConformance):
    step = {"quantize": {"dtypes": "bitmod4", "group_size": 16}}


class TestNas(StepConformance):
    step = {
        "nas": {
            "params_ratio": 0.6, "tolerance": 0.05, "proxy_samples": 2, "proxy_seq_len": 24, "population": 4,
            "generations": 2, "elites": 2, "mlp_step": 16, "skip_from": 2,
        }
    }  # fmt: skip


class TestDistill(StepConformance):
    before = [{"prune": {"ratio": 0.3}}]
    step = {"distill": {"samples": 4, "seq_len": 32, "batch_size": 2, "steps": 2, "global_steps": 1}}


def test_every_step_kind_has_a_conformance_class() -> None:
    """A handler without a conformance subclass here fails this test (the step's config class name → kind)."""
    covered = {next(iter(cls.step)) for cls in StepConformance.__subclasses__()}
    kinds = {kind.__name__.removesuffix("Step").lower() for kind in HANDLERS}
    assert kinds <= covered, f"add a StepConformance subclass for {sorted(kinds - covered)}"
