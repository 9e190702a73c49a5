"""The one metric table and the meters behind it.

A *metric* is a name a search may optimise or constrain and a report may show: its direction, whether it is
*structural* (known as soon as the steps ran, before any evaluation: a constraint on it can reject a candidate
for free) and how it is measured on a :class:`Probe` (a compressed model and what measuring it needs). Nothing
else lists metric names: ``search.objectives``, ``compress.session``, ``compress.evaluate`` and ``compress.info``
read :data:`METRICS` (and :func:`metric` for the open family ``lm_eval:<task>/<metric>``).

The meters are plain functions of a model: parameters, prunable parameters, tensor bytes, stored bits per weight,
forward latency, and recovery (compressed relative to dense).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from compress.adapters import Arch, decoder_layers, linear_shape, present_linears
from quant.errors import InputError
from quant.qlinear import QuantLinear

Direction = Literal["minimize", "maximize"]


# --- meters ------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once); a packed QuantLinear counts its logical weights."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
    return total


def prunable_parameters(model: nn.Module, arch: Arch) -> int:
    """Weights (and biases) of the attention and MLP linears of all decoder layers (the constants of removed
    sub-blocks are [hidden] vectors outside any linear and are not counted)."""
    total = 0
    for layer in decoder_layers(model, arch):
        for path in present_linears(layer, arch):
            out_features, in_features, has_bias = linear_shape(layer, path)
            total += out_features * in_features + (out_features if has_bias else 0)
    return total


def byte_size(tensors: Iterable[Tensor]) -> int:
    """Bytes of ``tensors``, each distinct tensor counted once."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of all unique parameters and buffers (what the checkpoint's safetensors hold, ± headers)."""
    return byte_size([*model.parameters(), *model.buffers()])


def stored_bits(module: nn.Module) -> int:
    """Bits a linear's weight is stored in: every tensor a checkpoint writes for a QuantLinear except its bias
    (bit planes and encoded metadata), or the float weight's element size."""
    if isinstance(module, QuantLinear):
        return 8 * byte_size(t for n, t in module.state_dict().items() if n != "bias")
    assert isinstance(module, nn.Linear)
    return 8 * byte_size([module.weight])


def average_bits(model: nn.Module, arch: Arch) -> float:
    """Stored bits per weight over all decoder linears (packed or float)."""
    bits, weights = 0, 0
    for layer in decoder_layers(model, arch):
        for path in present_linears(layer, arch):
            out_features, in_features, _ = linear_shape(layer, path)
            bits += stored_bits(layer.get_submodule(path))
            weights += out_features * in_features
    return bits / weights


@torch.no_grad()
def forward_latency_ms(model: Any, calibration: Tensor, tokens: int = 512, repeats: int = 3) -> float:
    """Median wall time (ms) of one forward over ``tokens`` tokens (batch 1), after one warm-up."""
    ids = calibration.reshape(1, -1)[:, :tokens].to(next(model.parameters()).device)
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(1000 * (time.perf_counter() - clock))
    return statistics.median(times)


# lm-eval metric names where lower is better; everything else lm-eval reports (acc, acc_norm, f1, ...) is maximised
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "ppl")


def recovery(metric: str, dense: float, compressed: float) -> float | None:
    """Compressed relative to dense, oriented so that 1.0 = full recovery and < 1 = worse."""
    if dense == 0 or compressed == 0:
        return None
    return dense / compressed if direction(metric) == "minimize" else compressed / dense


# --- the metric table ----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A compressed candidate and what measuring it needs. ``phi`` scores the proxy (Φ, Φ_norm) of the float model
    before quantization; ``lm_eval`` runs lm-eval tasks ({task/metric: value}). Results are cached per probe."""

    model: nn.Module
    arch: Arch
    tokenizer: Any
    calibration: Tensor
    perplexity: Any  # compress.recipe.PerplexityConfig
    phi: Callable[[], Any] | None = None
    lm_eval: Callable[[list[str]], dict[str, float]] | None = None
    wanted: list[str] = field(default_factory=list)  # every metric asked for (lm-eval tasks run once)
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclass(frozen=True)
class Metric:
    direction: Direction
    structural: bool  # known once the steps ran, before any evaluation
    measure: Callable[[Probe], float]
    about: str
    proxy: bool = False  # measured on the float model before any quantize step (Φ needs float weights)


def _ppl(probe: Probe) -> float:
    from compress.evaluate import perplexity

    return float(perplexity(probe.model, probe.tokenizer, probe.perplexity)["perplexity"])


def _phi(key: str) -> Callable[[Probe], float]:
    def measure(probe: Probe) -> float:
        if probe.phi is None:
            raise InputError(f"objective {key}: this candidate has no proxy (Φ needs dense-statistics pruning)")
        return float(getattr(probe.once("phi", probe.phi), key))

    return measure


METRICS: dict[str, Metric] = {
    "ppl": Metric("minimize", False, _ppl, "perplexity on the search's selection text"),
    "phi": Metric("maximize", False, _phi("phi"), "TraceNAS proxy Φ (gradient-trace alignment)", proxy=True),
    "phi_norm": Metric("maximize", False, _phi("phi_norm"), "Φ per active sub-block", proxy=True),
    "params": Metric("minimize", True, lambda p: float(count_parameters(p.model)), "parameters"),
    "prunable_params": Metric(
        "minimize", True, lambda p: float(prunable_parameters(p.model, p.arch)), "decoder linear parameters"
    ),
    "bytes": Metric("minimize", True, lambda p: float(tensor_bytes(p.model)), "bytes of parameters and buffers"),
    "avg_bits": Metric("minimize", True, lambda p: average_bits(p.model, p.arch), "stored bits per weight"),
    "latency_ms": Metric(
        "minimize", False, lambda p: forward_latency_ms(p.model, p.calibration), "forward ms (512 tokens)"
    ),
}
LM_EVAL = re.compile(r"^lm_eval:[^/\s]+/\S+$")


def _lm_eval(name: str) -> Callable[[Probe], float]:
    def measure(probe: Probe) -> float:
        if probe.lm_eval is None:
            raise InputError(f"objective {name!r}: no lm-eval runner for this candidate")
        runner = probe.lm_eval
        names = [n for n in probe.wanted if n.startswith("lm_eval:")] or [name]
        tasks = sorted({n.split(":", 1)[1].split("/")[0] for n in names})
        results = probe.once("lm_eval", lambda: runner(tasks))
        key = name.split(":", 1)[1]
        if key not in results:
            raise InputError(f"objective {name!r}: lm-eval reported {sorted(results)}")
        return float(results[key])

    return measure


def metric(name: str) -> Metric:
    """The table entry of ``name`` (``lm_eval:<task>/<metric>`` entries are made on demand); InputError naming
    the known metrics otherwise."""
    if name in METRICS:
        return METRICS[name]
    if LM_EVAL.match(name):
        measured = name.split("/", 1)[1].split(",")[0]
        lower = measured in LOWER_IS_BETTER or any(tag in measured for tag in LOWER_IS_BETTER)
        return Metric("minimize" if lower else "maximize", False, _lm_eval(name), "lm-eval task metric")
    known = ", ".join([*METRICS, "lm_eval:<task>/<metric>"])
    raise InputError(f"unknown metric {name!r}; expected one of {known}")


def direction(name: str) -> Direction:
    """"minimize" or "maximize" for a metric name; lm-eval results named ``task/metric`` (a report's rows) too."""
    if name in METRICS or name.startswith("lm_eval:"):
        return metric(name).direction
    measured = name.split("/")[-1].split(",")[0]
    return "minimize" if any(tag in measured for tag in LOWER_IS_BETTER) else "maximize"


def measure(probe: Probe, names: list[str]) -> dict[str, float]:
    """The values of ``names`` on ``probe`` (each metric looked up in the table, measured once)."""
    entries = {name: metric(name) for name in names}
    probe.wanted = list(dict.fromkeys([*probe.wanted, *names]))
    return {name: entry.measure(probe) for name, entry in entries.items()}
