"""Streamed steps: a recipe's prune and quantize steps applied one decoder layer at a time, each layer read from
the safetensors files when reached, staged to its own file once compressed, and freed.

Choice for multi-step recipes: the steps are *fused per layer*, with one activation stream per step that needs
one, so that every step sees exactly the inputs the in-memory path gives it (bit-identical results):

* a prune step first needs its global allocation: a pre-pass streams the dense layers once (statistics of the
  dense stream, unit scores while each layer is materialised; nothing is written);
* the main pass then visits layer i once: prune it (dense statistics: from the pre-pass; progressive: from its
  own stream through the already-pruned layers), quantize it (activation-aware: from its own stream through the
  already pruned-and-quantized layers), run the probe stream through it (for the reload check), stage it, free it.

* recovery (``compress.stream.recover``): least-squares reconstruction inside the prune step walks its dense and
  compressed calibration streams; a distill step takes its targets from layer i while it is still dense, then
  trains the compressed layer.

Streamable: one prune step (first; not puzzle), distill steps without global KD (the recipe puts them before
the quantize steps) and quantize steps. NAS steps and global KD hold or train several layers at once and run in memory
(``compress.pipeline`` decides).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from compress.adapters import Arch, attention_layout, decoder_layers, linear_at, model_config
from compress.calibration import (
    ChannelStats,
    HessianStats,
    LayerInputs,
    LayerStats,
    capture_layer0_inputs,
    run_layer,
)
from compress.calibration import _watch_inputs as watch_inputs
from compress.prune.allocate import top_units
from compress.prune.pruner import _apply, _module_units, _watch, mask_summary, masks_from_units, needs_statistics
from compress.quantize import _quantize_layer, _representative, target_paths
from compress.recipe import DistillStep, PruneConfig, PruneStep, QuantizeConfig, QuantizeStep, Step
from compress.stream.recover import LayerDistill, LayerRefit
from compress.stream.source import TensorSource, materialize, release
from compress.stream.writer import TensorEntry, header_bytes
from compress.verify import check_finite
from quant.hf import SecateursQuantConfig, module_spec
from quant.qlinear import QuantLinear

log = logging.getLogger("secateurs")


def not_streamable(steps: list[Step], export: str) -> str | None:
    """Why these steps cannot stream (None when they can)."""
    if export != "packed":
        return "export: dequantized writes the model through transformers"
    for index, step in enumerate(steps):
        if isinstance(step, PruneStep):
            cfg = step.prune
            if index != 0:
                return f"steps.{index}: a prune step streams only as the first step"
            if cfg.structure == "puzzle":
                return f"steps.{index}: structure: puzzle scores whole-model variants"
        elif isinstance(step, DistillStep):
            if step.distill.global_steps > 0:
                return f"steps.{index}: distill global_steps (global KD) backpropagates through every layer at once"
        elif not isinstance(step, QuantizeStep):
            return f"steps.{index}: a {type(step).__name__.removesuffix('Step').lower()} step holds several layers"
    return None


@dataclass
class Streamer:
    """A meta-device model whose decoder layers come from ``source`` and go to ``staging`` (one file per layer)."""

    model: nn.Module
    arch: Arch
    source: TensorSource
    dtype: torch.dtype
    staging: Path
    device: str | None = None
    source_name: str = "model"
    seconds: list[float] = field(default_factory=list)  # main-pass wall time per layer
    statistics_seconds: list[float] = field(default_factory=list)  # pre-pass wall time per layer
    packed: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)  # packed tensors staged
    packed_weights: int = 0  # logical weights of the packed linears staged
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # packed-format spec per staged module

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model, self.arch)

    def prefix(self, index: int) -> str:
        return f"{self.arch.layers}.{index}."

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        materialize(layer, self.prefix(index), self.source, self.dtype)
        check_finite(layer, f"{self.source_name} layer {index}")
        return layer.to(self.device) if self.device is not None else layer

    def outer(self, path: str) -> nn.Module:
        """Materialise a non-layer module (embeddings, final norm, head) from the source."""
        module = self.model.get_submodule(path)
        materialize(module, f"{path}.", self.source, self.dtype)
        return module.to(self.device) if self.device is not None else module

    def capture(self, input_ids: Tensor, batch_size: int) -> LayerInputs:
        """Layer-0 inputs of ``input_ids`` (the embeddings are materialised for it and freed again)."""
        embed = self.outer(self.arch.embed)
        layers = self.layers
        first = layers[0]
        # the capture sends the tokens to layer 0's device (no layer runs): an anchor names it
        layers[0] = _Anchor(embed.get_parameter("weight").device)
        try:
            return capture_layer0_inputs(self.model, self.arch, input_ids, batch_size)
        finally:
            layers[0] = first
            release(embed)
            self.retie()

    def retie(self) -> None:
        """A tied head shares the embeddings' (meta) parameter again (materialising replaced it)."""
        from compress.stream.output import tied_head

        if tied_head(self.model):
            head = self.model.get_submodule(self.arch.lm_head)
            head._parameters["weight"] = self.model.get_submodule(self.arch.embed).get_parameter("weight")

    def stage(self, index: int, layer: nn.Module) -> Path:
        path = self.staging / f"layer-{index:05d}.safetensors"
        state = {self.prefix(index) + k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt"})
        for name, module in layer.named_modules():
            if isinstance(module, QuantLinear):
                self.specs[f"{self.prefix(index)}{name}"] = module_spec(module, module.dtypes)
                self.packed_weights += module.in_features * module.out_features
                for key, t in module.state_dict().items():
                    if key != "bias":
                        self.packed.append((f"{self.prefix(index)}{name}.{key}", t.dtype, tuple(t.shape)))
        return path

    def quantization_config(self) -> dict[str, Any] | None:
        """``compress.checkpoint.quantization_config`` of the staged layers."""
        return SecateursQuantConfig(dict(sorted(self.specs.items()))).to_dict() if self.specs else None

    def weight_storage(self) -> dict[str, Any]:
        """``compress.quantize.weight_storage`` of the staged layers (the model itself is on meta by now)."""
        if not self.packed_weights:
            return {"quantized_weights": 0, "bits_per_weight": None, "file_bits_per_weight": None}
        entries = [TensorEntry(n, d, s, lambda: torch.empty(0)) for n, d, s in self.packed]
        data = sum(e.nbytes for e in entries)
        head, _ = header_bytes(entries, {})
        return {
            "quantized_weights": self.packed_weights,
            "bits_per_weight": 8 * data / self.packed_weights,
            "file_bits_per_weight": 8 * (len(head) + data) / self.packed_weights,
        }

    def staged_files(self) -> list[Path]:
        return [self.staging / f"layer-{i:05d}.safetensors" for i in range(len(self.layers))]


class _Anchor(nn.Module):
    """Stands in for a meta-device layer 0 while its inputs are captured: it only names the device."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)


def _quant_watch(cfg: QuantizeConfig, arch: Arch) -> Any:
    """As ``compress.quantize.quantize_model``: one watched linear per shared input of the targeted linears."""

    def watch(_index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        reps = {_representative(arch, path) for path in target_paths(cfg, arch, layer)}
        return {path: linear_at(layer, path) for path in sorted(reps)}

    return watch


def _quant_factory(cfg: QuantizeConfig) -> Any:
    def factory(channels: int) -> ChannelStats:
        if cfg.method == "rtn":
            return ChannelStats(channels)
        return HessianStats(channels, cfg.awq_tokens if "awq" in cfg.method else 0)

    return factory


def prune_pre_pass(
    streamer: Streamer, cfg: PruneConfig, calibration: Tensor | None, batch_size: int
) -> tuple[list[LayerStats] | list[None], list[Tensor], list[Tensor]]:
    """Dense statistics (when the method needs them) and unit scores, one layer at a time → global keep-masks."""
    config = model_config(streamer.model)
    hidden = int(config.hidden_size)
    needs = needs_statistics(cfg)
    if needs and calibration is None:
        raise ValueError(f"{cfg.method} needs calibration data")
    inputs = streamer.capture(calibration, batch_size) if needs and calibration is not None else None
    watch = _watch(streamer.arch)
    stats: list[Any] = []
    units = []
    for index in range(len(streamer.layers)):
        clock = time.perf_counter()
        layer = streamer.load(index)
        st: LayerStats | None = None
        if inputs is not None:
            inputs = inputs.for_layer(index)
            with watch_inputs(watch(index, layer), ChannelStats) as st:
                outputs = run_layer(layer, inputs)
            inputs = inputs.passed_on(outputs)
        units.append(
            _module_units(cfg, layer, streamer.arch, attention_layout(config, layer, streamer.arch), st, hidden)
        )
        stats.append(st)
        release(layer)
        streamer.statistics_seconds.append(time.perf_counter() - clock)
        log.info("statistics layer %d/%d: %.1f s", index + 1, len(streamer.layers), streamer.statistics_seconds[-1])
    attn, mlp = masks_from_units(units, cfg)
    return stats, attn, mlp


@torch.no_grad()
def stream_steps(
    streamer: Streamer,
    steps: list[Step],
    calibration: Tensor | None,
    batch_size: int,
    probe: Tensor,
    distill_ids: list[Tensor] | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], Tensor]:
    """Apply ``steps`` layer by layer (see the module docstring); returns the step records and the probe's final
    hidden states [n, L, hidden] through the compressed layers (for the reload check). ``distill_ids``: the
    training windows of each distill step, in order (``compress.recover.step.distill_windows`` under ``seed``)."""
    arch, config = streamer.arch, model_config(streamer.model)
    hidden = int(config.hidden_size)
    prune = steps[0].prune if steps and isinstance(steps[0], PruneStep) else None
    quants = [step.quantize for step in steps if isinstance(step, QuantizeStep)]
    records: list[dict[str, Any]] = [{} for _ in steps]
    modules: list[dict[str, str]] = [{} for _ in quants]
    stats: list[Any] = []
    attn_keep: list[Tensor] = []
    mlp_keep: list[Tensor] = []
    if prune is not None:
        stats, attn_keep, mlp_keep = prune_pre_pass(streamer, prune, calibration, batch_size)
    refit = prune is not None and prune.reconstruct == "least_squares"
    progressive = not refit and prune is not None and prune.statistics == "progressive" and needs_statistics(prune)
    wants = progressive or refit or any(q.activation_aware for q in quants)
    if wants and calibration is None:
        raise ValueError("an activation-aware step needs calibration data")
    start = streamer.capture(calibration, batch_size) if wants and calibration is not None else None
    prune_stream = start if progressive else None
    ls = LayerRefit.start(streamer, prune, (stats, attn_keep, mlp_keep), start) if prune and refit and start else None
    distills = [step.distill for step in steps if isinstance(step, DistillStep)]
    blds = [LayerDistill.start(streamer, d, ids, seed) for d, ids in zip(distills, distill_ids or [], strict=True)]
    quant_streams = [start if q.activation_aware else None for q in quants]
    probe_stream = streamer.capture(probe, batch_size)
    watch = _watch(arch)
    for index in range(len(streamer.layers)):
        clock = time.perf_counter()
        layer = streamer.load(index)
        for bld in blds:
            bld.observe(index, layer)  # still dense: the targets
        if ls is not None:
            ls.apply(index, layer)
        elif prune is not None:
            layout = attention_layout(config, layer, arch)
            if prune_stream is not None:
                prune_stream = prune_stream.for_layer(index)
                with watch_inputs(watch(index, layer), ChannelStats) as st:
                    run_layer(layer, prune_stream)
                a_units, m_units = _module_units(prune, layer, arch, layout, st, hidden)
                a_keep = top_units(a_units.scores, int(attn_keep[index].sum()))
                m_keep = top_units(m_units.scores, int(mlp_keep[index].sum()))
                _apply(layer, arch, prune, layout, st, a_keep, m_keep)
                prune_stream = prune_stream.passed_on(run_layer(layer, prune_stream))
            else:
                _apply(layer, arch, prune, layout, stats[index], attn_keep[index], mlp_keep[index])
        for bld in blds:
            bld.apply(index, arch, layer)
        for k, qcfg in enumerate(quants):
            stream = quant_streams[k]
            stream = stream.for_layer(index) if stream is not None else None
            if stream is None:
                _quantize_layer(layer, index, arch, qcfg, None, modules[k])
                continue
            with watch_inputs(_quant_watch(qcfg, arch)(index, layer), _quant_factory(qcfg)) as qst:
                run_layer(layer, stream)
            _quantize_layer(layer, index, arch, qcfg, qst, modules[k])
            qst.clear()
            quant_streams[k] = stream.passed_on(run_layer(layer, stream))
        probe_stream = probe_stream.for_layer(index)
        probe_stream = probe_stream.passed_on(run_layer(layer, probe_stream))
        streamer.stage(index, layer)
        release(layer)
        streamer.seconds.append(time.perf_counter() - clock)
        log.info("layer %d/%d compressed and staged: %.1f s", index + 1, len(streamer.layers), streamer.seconds[-1])
    quant_index = 0
    finished = iter(blds)
    for index, step in enumerate(steps):
        if isinstance(step, PruneStep):
            records[index] = {"method": step.prune.method, **mask_summary(attn_keep, mlp_keep)}
            if ls is not None:
                records[index]["refit_residual"] = ls.records
        elif isinstance(step, DistillStep):
            records[index] = next(finished).record(streamer.source_name)
        elif isinstance(step, QuantizeStep):
            records[index] = {"modules": modules[quant_index]}
            quant_index += 1
    return records, torch.cat([h.to("cpu") for h in probe_stream.hidden])
