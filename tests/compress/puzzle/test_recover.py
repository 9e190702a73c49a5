"""Puzzle with least-squares reconstruction: the chosen architecture's consumers refitted (lower output error
than bias compensation, the same model as FLAP's least-squares path for the same widths), mixed no-op / linear
layers reloading with equal logits, and a following blockwise distillation."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from compress.adapters import arch_for, decoder_layers
from compress.checkpoint import write_checkpoint
from compress.prune.pruner import collect_statistics, count_parameters, module_units, prune_model
from compress.puzzle.config import PuzzleConfig
from compress.puzzle.step import run_puzzle
from compress.recipe import PruneConfig
from compress.recover.distill import TrainSettings, distill_blocks
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


def _ids(n: int = 16, length: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def parent():
    model = build_tiny("llama", num_hidden_layers=4)
    arch = arch_for(model.config)
    return model, arch, collect_statistics(model, arch, _ids(), 4)


def _prune(ratio: float, reconstruct: str, allow_linear: bool = False) -> PruneConfig:
    puzzle = PuzzleConfig(mlp_steps=4, samples=4, seq_len=16, allow_linear=allow_linear, fit_samples=8)
    return PruneConfig(method="flap", structure="puzzle", ratio=ratio, reconstruct=reconstruct, puzzle=puzzle)


def _run(parent, tmp_path, cfg: PruneConfig):
    model, arch, stats = parent
    assert cfg.puzzle is not None
    pcfg = cfg.puzzle.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    pruned = copy.deepcopy(model)
    record = run_puzzle(pruned, arch, cfg.ratio, pcfg, _ids(), batch_size=4, dense_stats=stats, prune=cfg)
    return pruned, record


@torch.no_grad()
def _output_error(model: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor) -> float:
    """Relative squared error of the last decoder layer's output against the dense model's."""
    out = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    ref = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float(((out - ref) ** 2).sum() / (ref**2).sum())


def test_least_squares_lowers_the_output_error_of_the_same_choice(parent, tmp_path):
    model, arch, _ = parent
    bias, bias_record = _run(parent, tmp_path, _prune(0.5, "bias"))
    ls, ls_record = _run(parent, tmp_path, _prune(0.5, "least_squares"))
    for key in ("kv_groups", "intermediate_sizes", "skipped"):
        assert ls_record[key] == bias_record[key]  # the same library, budget and choice
    assert ls_record["parameters"] == bias_record["parameters"] == count_parameters(ls)
    assert len(ls_record["refit_residual"]) == 4 and any(ls_record["refit_residual"])
    assert _output_error(ls, model, _ids()) < _output_error(bias, model, _ids())


def test_equals_flap_least_squares_at_the_chosen_widths(parent, tmp_path):
    """Without linear replacements the result is FLAP's own least-squares path given the chosen widths (an
    independent implementation of the same walk): its ``equivalent_prune_step`` reproduces the weights."""
    model, arch, stats = parent
    ls, record = _run(parent, tmp_path, _prune(0.5, "least_squares"))
    equivalent = PruneConfig(**record["equivalent_prune_step"])
    assert equivalent.reconstruct == "least_squares"
    reference = copy.deepcopy(model)
    prune_model(reference, arch, equivalent, _ids(), 4, None, stats)
    ids = _ids(2, 12, seed=9)
    with torch.no_grad():
        assert torch.allclose(ls(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_noops_and_linear_replacements_refit_and_reload(parent, tmp_path):
    """A hand-made choice with linear replacements, no-ops and mixed widths (whether the MILP prefers a linear map
    depends on its out-of-sample score; on this random tiny model it does not) refitted by least squares."""
    from compress.puzzle.library import Variant
    from compress.puzzle.recover import reconstruct_choice
    from compress.puzzle.step import choice_summary
    from compress.recover.least_squares import RIDGE_GRID
    from compress.remote.modeling_secateurs import LinearSubBlock

    model, arch, stats = parent
    pruned = copy.deepcopy(model)
    labels = ["attn:2", "mlp:linear", "attn:linear", "mlp:48", "attn:noop", "mlp:noop", "attn:1", "mlp:linear"]
    chosen = [Variant.parse(label) for label in labels]
    units = module_units(model, arch, PruneConfig(method="flap"), stats)
    refit = reconstruct_choice(pruned, arch, stats, units, chosen, _ids(), RIDGE_GRID, 4)
    record = choice_summary(chosen)
    assert record["linear"] == [["mlp"], ["attn"], [], ["mlp"]] and record["skipped"][2] == ["attn", "mlp"]
    assert len(refit) == 4
    layers = decoder_layers(pruned, arch)
    for index, kinds in enumerate(record["linear"]):
        for kind in kinds:
            assert isinstance(layers[index].get_submodule(arch.sub_block(kind)[0]), LinearSubBlock)
    out = write_checkpoint(pruned, build_tiny_tokenizer(tmp_path / "tok"), arch, tmp_path / "ckpt", {"recipe": {}})
    ids = _ids(2, 12)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = pruned(input_ids=ids).logits
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float((torch.load(tmp_path / "logits.pt", weights_only=True) - expected).abs().max()) <= 1e-5


def test_distillation_trains_the_refitted_choice(parent, tmp_path):
    """A ``distill`` step after the puzzle step: blockwise distillation of the refitted mixed-width model
    against the dense parent lowers every block's loss and the output error."""
    model, arch, _ = parent
    pruned, record = _run(parent, tmp_path, _prune(0.5, "least_squares"))
    before = _output_error(pruned, model, _ids(8, 24, seed=6))
    losses = distill_blocks(model, pruned, arch, _ids(8, 24, seed=6), TrainSettings(8, 1e-4), 0, batch_size=4)
    assert len(losses) == 4 and all(r["loss_after"] < r["loss_before"] for r in losses), losses
    assert _output_error(pruned, model, _ids(8, 24, seed=6)) < before
    assert count_parameters(pruned) == record["parameters"]


def test_linear_replacement_setting_is_refused(parent, tmp_path):
    cfg = PruneConfig(method="flap", structure="puzzle", ratio=0.5, reconstruct="least_squares", replacement="linear")
    with pytest.raises(InputError, match="allow_linear"):
        _run(parent, tmp_path, cfg)
