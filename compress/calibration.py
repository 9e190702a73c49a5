"""The one layer-by-layer calibration engine.

Capture the inputs of decoder layer 0 for the calibration set, then for each layer: move it to the compute
device, run it on the cached inputs with forward hooks feeding statistic accumulators, optionally let the caller
modify the layer (progressive pruning), and pass its outputs on as the next layer's inputs. Peak memory is one
layer plus the activations of the calibration set; statistics stream in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compress.adapters import Arch, decoder_layers


@dataclass
class ChannelStats:
    """Streaming first and second moments of the C input channels of one linear layer (float64).

    After N tokens: mean_j = Σx_j / N, sample variance V_j = (Σx_j² − N·mean_j²) / (N − 1), ‖x_j‖₂² = Σx_j².
    """

    channels: int
    count: int = 0
    total: Tensor = field(init=False)
    total_sq: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.channels, dtype=torch.float64)
        self.total_sq = torch.zeros(self.channels, dtype=torch.float64)

    def add_batch(self, x: Tensor) -> None:
        """x: [..., C] activations entering the linear layer."""
        x = x.detach().reshape(-1, self.channels).to(torch.float64).cpu()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def variance(self) -> Tensor:
        """Sample variance (N − 1 denominator), clamped at 0 against cancellation."""
        return ((self.total_sq - self.count * self.mean**2) / max(self.count - 1, 1)).clamp_min(0.0)

    @property
    def sq_norm(self) -> Tensor:
        """‖x_j‖₂² over all tokens (Wanda's activation norm, squared)."""
        return self.total_sq

    @property
    def mean_sq(self) -> Tensor:
        """E[x_j²] (WIFN's and activation-aware quantization's second moment)."""
        return self.total_sq / self.count


class HessianStats(ChannelStats):
    """ChannelStats plus the Gram matrix Σ x xᵀ (float64 [C, C]: GPTQ's H = 2XXᵀ/N) and the first
    ``sample_tokens`` input rows (float32 [≤ sample_tokens, C]: AWQ's scale and clip search). Each mini-batch's
    XᵀX is formed in float32 (≤ batch × seq_len tokens, relative error ~1e-6, half the cost of float64 on CPU)
    and accumulated in float64."""

    def __init__(self, channels: int, sample_tokens: int = 0) -> None:
        super().__init__(channels)
        self.sample_tokens = sample_tokens
        self.gram = torch.zeros(channels, channels, dtype=torch.float64)
        self.samples: list[Tensor] = []

    def add_batch(self, x: Tensor) -> None:
        super().add_batch(x)
        x32 = x.detach().reshape(-1, self.channels).float().cpu()
        self.gram += (x32.T @ x32).double()
        kept = sum(s.shape[0] for s in self.samples)
        if kept < self.sample_tokens:
            self.samples.append(x32[: self.sample_tokens - kept].clone())

    @property
    def hessian(self) -> Tensor:
        """H = 2XXᵀ/N, float64 [C, C]."""
        return 2.0 * self.gram / max(self.count, 1)

    @property
    def sample(self) -> Tensor:
        """float32 [n ≤ sample_tokens, C]: the first input rows seen."""
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.channels)


LayerStats = dict[str, ChannelStats]
StatsFactory = Callable[[int], ChannelStats]
WatchFn = Callable[[int, nn.Module], dict[str, nn.Linear]]
AfterLayerFn = Callable[[int, nn.Module, LayerStats], bool]


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Cached inputs of one decoder layer, in mini-batches: hidden states [b, L, hidden] + the layer kwargs.

    ``layer_kwargs`` (per decoder layer, per mini-batch) is set when layers receive different kwargs: sliding-window
    and global layers get different masks (Gemma 2/3, Qwen with ``layer_types``), Gemma 3's local and global layers
    different rotary tables. :meth:`for_layer` gives layer i its own; None: every layer takes ``kwargs``.
    """

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]
    layer_kwargs: list[list[dict[str, Any]]] | None = None

    def for_layer(self, index: int) -> LayerInputs:
        """The same hidden states with decoder layer ``index``'s own kwargs."""
        if self.layer_kwargs is None:
            return self
        return LayerInputs(self.hidden, self.layer_kwargs[index], self.layer_kwargs)

    def passed_on(self, outputs: list[Tensor]) -> LayerInputs:
        """``outputs`` as the next layer's hidden states, keeping the kwargs."""
        return LayerInputs(outputs, self.kwargs, self.layer_kwargs)


class _KwargsRecorder(nn.Module):
    """Stands in for decoder layer ``index`` during :func:`capture_layer0_inputs`: records what the model passes
    it and hands the hidden states on unchanged (no layer runs; the last one stops the forward)."""

    def __init__(self, index: int, sink: list[list[dict[str, Any]]], hidden: list[Tensor], last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.hidden, self.last = index, sink, hidden, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.hidden.append(hidden)
        self.sink[self.index].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if self.last:
            raise _StopForward
        return hidden


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, arch: Arch, input_ids: Tensor, batch_size: int) -> LayerInputs:
    """Run the model up to decoder layer 0 and record what it receives (hidden states, masks, rotary cos/sin), and
    what every other layer receives (its mask and rotary table: they differ between sliding-window and global
    layers). The layers themselves do not run: each is replaced by a recorder for the duration of the capture."""
    layers = decoder_layers(model, arch)
    originals = list(layers)
    hidden: list[Tensor] = []
    sink: list[list[dict[str, Any]]] = [[] for _ in originals]
    device = next(originals[0].parameters()).device
    try:
        for index in range(len(originals)):
            layers[index] = _KwargsRecorder(index, sink, hidden, last=index == len(originals) - 1)
        for chunk in input_ids.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    uniform = all(_same_kwargs(a, b) for per_layer in sink[1:] for a, b in zip(sink[0], per_layer, strict=True))
    return LayerInputs(hidden, sink[0], None if uniform else sink)


@contextmanager
def _watch_inputs(modules: dict[str, nn.Linear], factory: StatsFactory = ChannelStats) -> Iterator[LayerStats]:
    stats = {name: factory(m.in_features) for name, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add_batch(args[0]))
        for name, m in modules.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _run_layer(layer: nn.Module, inputs: LayerInputs) -> list[Tensor]:
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def calibrate_layerwise(
    model: nn.Module,
    arch: Arch,
    input_ids: Tensor,
    watch: WatchFn,
    after_layer: AfterLayerFn | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    desc: str = "calibrating",
    stats_factory: StatsFactory = ChannelStats,
) -> list[LayerStats]:
    """Collect input-channel statistics of the ``watch``-ed linears of every decoder layer, one layer at a time.

    Args:
        input_ids: [n_samples, seq_len] calibration tokens.
        watch: (layer_index, layer) -> {name: linear} whose inputs to accumulate.
        after_layer: optional (layer_index, layer, stats) -> changed; when it modifies the layer (returns True) the
            layer is re-run so that the next layer sees the modified layer's outputs (progressive calibration).
        device: where each layer runs; the layer is moved there and back (default: where it already is).
        stats_factory: channels -> accumulator (default ChannelStats; HessianStats for GPTQ/AWQ).
    Returns: one {name: ChannelStats} per layer.
    """
    layers = decoder_layers(model, arch)
    inputs = capture_layer0_inputs(model, arch, input_ids, batch_size)
    all_stats: list[LayerStats] = []
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
        layer = layers[index]
        home = next(layer.parameters()).device
        target = torch.device(device) if device is not None else home
        layer.to(target)
        inputs = _to_device(inputs.for_layer(index), target)
        with _watch_inputs(watch(index, layer), stats_factory) as stats:
            outputs = _run_layer(layer, inputs)
        if after_layer is not None and after_layer(index, layer, stats):
            outputs = _run_layer(layer, inputs)
        all_stats.append(stats)
        inputs = inputs.passed_on(outputs)
        layer.to(home)
    return all_stats


def _to_device(inputs: LayerInputs, device: torch.device) -> LayerInputs:
    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return LayerInputs(
        [h.to(device) for h in inputs.hidden],
        [{k: move(v) for k, v in kw.items()} for kw in inputs.kwargs],
        inputs.layer_kwargs,
    )


def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[Tensor]:
    """Hidden-state outputs of ``layer`` for every cached mini-batch of ``inputs`` (grad mode as the caller's)."""
    return _run_layer(layer, inputs)


# (layer index, dense layer, compressed layer, dense-stream inputs, compressed-stream inputs)
#   -> (dense-stream outputs, compressed-stream outputs)
PairedVisitFn = Callable[[int, nn.Module, nn.Module, LayerInputs, LayerInputs], tuple[list[Tensor], list[Tensor]]]


def calibrate_paired(
    dense_model: nn.Module,
    model: nn.Module,
    arch: Arch,
    input_ids: Tensor,
    visit: PairedVisitFn,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    desc: str = "recovering",
) -> None:
    """Walk two activation streams through the decoder layers together, one layer (pair) at a time.

    The *dense* stream is what the unmodified layers produce, the *compressed* stream what the already-modified
    prefix of ``model`` produces; both start from the same layer-0 inputs (embeddings are never compressed).
    ``visit`` gets layer i of ``dense_model`` and of ``model`` (the same module when ``dense_model is model``:
    the layer is still dense when visited and ``visit`` may modify it after running it on the dense stream), the
    two streams' inputs, and returns the two streams' outputs (the next layer's inputs). Peak memory: one layer
    pair plus the two streams' activations. Gradients are enabled only where ``visit`` enables them.
    """
    dense_layers, layers = decoder_layers(dense_model, arch), decoder_layers(model, arch)
    if len(dense_layers) != len(layers):
        raise ValueError(f"dense model has {len(dense_layers)} decoder layers, compressed {len(layers)}")
    with torch.no_grad():
        dense = capture_layer0_inputs(model, arch, input_ids, batch_size)
    compressed = dense
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
        pair = [dense_layers[index], layers[index]]
        homes = [next(m.parameters()).device for m in pair]
        target = torch.device(device) if device is not None else homes[1]
        for m in pair:
            m.to(target)
        dense, compressed = _to_device(dense.for_layer(index), target), _to_device(compressed.for_layer(index), target)
        dense_out, compressed_out = visit(index, pair[0], pair[1], dense, compressed)
        dense, compressed = dense.passed_on(dense_out), compressed.passed_on(compressed_out)
        for m, home in zip(pair, homes, strict=True):
            m.to(home)
