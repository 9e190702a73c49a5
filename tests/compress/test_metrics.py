"""compress/metrics.py: the one metric table (directions, structural flags, lm-eval family) and the meters."""

import pytest
import torch

from compress.adapters import arch_for
from compress.metrics import (
    METRICS,
    Probe,
    average_bits,
    byte_size,
    count_parameters,
    direction,
    measure,
    metric,
    prunable_parameters,
    recovery,
    tensor_bytes,
)
from compress.recipe import PerplexityConfig
from quant.errors import InputError
from tests.conftest import build_tiny


def test_table_directions_and_structural_flags():
    assert {n for n, m in METRICS.items() if m.direction == "maximize"} == {"phi", "phi_norm"}
    assert {n for n, m in METRICS.items() if m.structural} == {"params", "prunable_params", "bytes", "avg_bits"}
    assert {n for n, m in METRICS.items() if m.proxy} == {"phi", "phi_norm"}


def test_lm_eval_family_and_report_rows():
    assert metric("lm_eval:secateurs_web_mc/acc").direction == "maximize"
    assert metric("lm_eval:secateurs_web_ppl/word_perplexity").direction == "minimize"
    assert not metric("lm_eval:secateurs_web_mc/acc").structural
    assert direction("heldout/perplexity") == "minimize" and direction("secateurs_web_mc/acc_norm") == "maximize"
    with pytest.raises(InputError, match="unknown metric 'perplexity'; expected one of ppl, phi"):
        metric("perplexity")


def test_recovery_is_oriented_so_that_one_is_full_recovery():
    assert recovery("heldout/perplexity", 10.0, 20.0) == 0.5
    assert recovery("secateurs_web_mc/acc", 0.8, 0.6) == pytest.approx(0.75)
    assert recovery("secateurs_web_mc/acc", 0.0, 0.6) is None


def test_meters_on_a_tiny_model():
    model = build_tiny("llama")
    arch = arch_for(model.config)
    # tied embeddings are counted once; 2 layers × (q 48·48, k/v 48·24, o 48·48, gate/up/down 3·48·96)
    linears = 2 * (2 * 48 * 48 + 2 * 48 * 24 + 3 * 48 * 96)
    assert prunable_parameters(model, arch) == linears
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert tensor_bytes(model) == 4 * count_parameters(model) + byte_size(model.buffers())
    assert average_bits(model, arch) == 32.0
    shared = torch.zeros(3)
    assert byte_size([shared, shared]) == 12


def test_measure_reads_the_table_and_caches_per_probe():
    model = build_tiny("llama")
    arch = arch_for(model.config)
    calls = []

    def phi():
        calls.append(1)
        return type("Score", (), {"phi": 3.0, "phi_norm": 0.75})()

    probe = Probe(model, arch, None, torch.zeros(1, 8, dtype=torch.long), PerplexityConfig(), phi=phi)
    out = measure(probe, ["params", "phi", "phi_norm"])
    assert out == {"params": float(count_parameters(model)), "phi": 3.0, "phi_norm": 0.75}
    assert calls == [1]  # Φ and Φ_norm come from one proxy score
