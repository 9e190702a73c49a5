"""Puzzle's linear replacement of removed sub-blocks (compress.recover.reconstruct.replace_linear)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from compress.adapters import arch_for, decoder_layers, is_skipped
from compress.calibration import capture_layer0_inputs, run_layer
from compress.pipeline import run
from compress.recover.least_squares import PairStats, reduced_rank, ridge_refit
from compress.recover.reconstruct import replace_linear
from compress.remote.modeling_secateurs import LinearSubBlock
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


class _AffineMlp(nn.Module):
    """An MLP sub-block that is exactly affine: W x + b, W of rank ``rank``."""

    def __init__(self, hidden: int, rank: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        factors = torch.randn(hidden, rank, generator=g), torch.randn(rank, hidden, generator=g)
        self.weight = nn.Parameter(factors[0] @ factors[1] / hidden)
        self.bias = nn.Parameter(torch.randn(hidden, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


@pytest.mark.parametrize("rank", [0, 4])
def test_recovers_an_exactly_linear_sub_block(rank: int) -> None:
    model = build_tiny("llama")
    arch = arch_for(model.config)
    hidden = model.config.hidden_size
    layer = decoder_layers(model, arch)[1]
    layer.mlp = _AffineMlp(hidden, rank or hidden, seed=1)
    ids = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inputs = capture_layer0_inputs(model, arch, ids, 4)
        inputs.hidden = run_layer(decoder_layers(model, arch)[0], inputs)
        targets: list[torch.Tensor] = []
        handle = layer.mlp.register_forward_hook(lambda _m, _a, out: targets.append(out))
        expected = run_layer(layer, inputs)
        handle.remove()
        record = replace_linear(layer, arch, "mlp", inputs, targets, [0.0], rank, (model.config, 1), 0)
        got = run_layer(layer, inputs)
    assert isinstance(layer.mlp, LinearSubBlock) and is_skipped(layer, arch, "mlp")
    assert record["residual"] < 1e-8
    err = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    assert err < 1e-4
    assert model.config.secateurs_linear[1] == {"mlp": rank}


def test_reduced_rank_matches_the_truncated_svd_of_the_fitted_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 10, generator=g, dtype=torch.float64)
    noise = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = z @ torch.randn(10, 8, generator=g, dtype=torch.float64) + 0.1 * noise
    stats = PairStats(10, 8)
    stats.add_batch(z, y)
    w, _ = ridge_refit(stats, torch.zeros(8, 10), 0.0)
    up, down, bias = reduced_rank(stats, w, 3)
    fitted = (z - z.mean(0)) @ w.T  # Ŷ_c [n, out]: its best rank-3 approximation is the reference
    top = torch.linalg.svd(fitted, full_matrices=False).Vh[:3]
    assert torch.allclose((z - z.mean(0)) @ (up @ down).T, fitted @ top.T @ top, atol=1e-9)
    assert torch.allclose(bias, y.mean(0) - (up @ down) @ z.mean(0), atol=1e-12)
    with pytest.raises(ValueError, match="rank"):
        reduced_rank(stats, w, 9)


def test_checkpoint_with_linear_replacements_reloads_in_a_fresh_process(tmp_path) -> None:
    folder = tmp_path / "tiny"
    build_tiny("llama", num_hidden_layers=3).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    prune = {
        "reconstruct": "least_squares",
        "replacement": "linear",
        "attn_groups": [3, 0, 2],
        "mlp_channels": [96, 48, 0],
    }
    recipe = {
        "model": str(folder),
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 2},
        "steps": [{"prune": prune}],
        "output": {"dir": str(tmp_path / "out")},
        "evaluation": None,
    }
    result = run(recipe)
    layers = decoder_layers(result.model, arch_for(result.model.config))
    assert isinstance(layers[1].self_attn, LinearSubBlock) and isinstance(layers[2].mlp, LinearSubBlock)
    low = {**recipe, "steps": [{"prune": {**prune, "replacement_rank": 4}}], "output": {"dir": str(tmp_path / "r4")}}
    full = run(low)
    assert decoder_layers(full.model, arch_for(full.model.config))[2].mlp.up.shape == (48, 4)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    for name, res in (("full", result), ("rank4", full)):
        with torch.no_grad():
            expected = res.model(input_ids=ids).logits
        code = (
            "import torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(res.checkpoint)!r}, trust_remote_code=True,"
            " dtype=torch.float32)\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
            "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
            f"torch.save(logits, {str(tmp_path / (name + '.pt'))!r})\n"
        )
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert float((torch.load(tmp_path / (name + ".pt"), weights_only=True) - expected).abs().max()) <= 1e-5
