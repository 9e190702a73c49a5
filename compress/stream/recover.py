"""Streamed recovery: least-squares reconstruction and blockwise local distillation, one decoder layer at a time.

Both walk two activation streams through the layers, as ``compress.calibration.calibrate_paired`` does in memory,
but the dense parent of layer i is layer i itself, read from the safetensors files *before* any step changes it:

* :class:`LayerRefit` (a prune step with ``reconstruct: least_squares``): the dense stream (the calibration
  windows through the dense layers: the targets) and the compressed stream (through the already pruned and
  refitted layers: what the refit sees). ``compress.recover.reconstruct.reconstruct_at`` prunes and refits the
  still-dense layer exactly as in memory.
* :class:`LayerDistill` (a ``distill`` step without global KD): :meth:`LayerDistill.observe` runs the dense layer
  on the distill windows' dense stream (the targets, and the next layer's dense inputs) before the prune step
  changes it; :meth:`LayerDistill.apply` trains the compressed layer with ``compress.recover.distill.distill_layer``
  (same optimiser, seed and batches as ``distill_blocks``), from the dense stream or, with ``inputs: compressed``,
  from its own stream through the already distilled layers.

Global KD trains every layer at once against the whole dense model and does not stream (``not_streamable``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from compress.adapters import model_config
from compress.calibration import LayerInputs, LayerStats, run_layer
from compress.recipe import DistillConfig, PruneConfig
from compress.recover.distill import TrainSettings, distill_layer
from compress.recover.least_squares import RIDGE_GRID
from compress.recover.reconstruct import reconstruct_at, ridge_alphas
from compress.recover.step import distill_record
from quant.errors import InputError

if TYPE_CHECKING:
    from compress.stream.engine import Streamer

log = logging.getLogger("secateurs")


@dataclass
class LayerRefit:
    """Least-squares reconstruction of the prune step, layer by layer (module docstring)."""

    streamer: Streamer
    cfg: PruneConfig
    stats: list[LayerStats] | list[None]
    attn_keep: list[Tensor]
    mlp_keep: list[Tensor]
    dense: LayerInputs  # calibration windows through the dense layers
    compressed: LayerInputs  # ... through the pruned and refitted layers
    records: list[dict[str, dict[str, float]]] = field(default_factory=list)

    @classmethod
    def start(
        cls, streamer: Streamer, cfg: PruneConfig, masks: tuple[Any, list[Tensor], list[Tensor]], inputs: LayerInputs
    ) -> LayerRefit:
        """``masks``: the pre-pass's (dense statistics, attention keep-masks, MLP keep-masks); ``inputs``: the
        calibration windows' layer-0 inputs (both streams start there: embeddings are never compressed)."""
        if cfg.statistics == "progressive":
            raise InputError("prune.reconstruct: least_squares needs statistics: dense (it corrects the prefix itself)")
        return cls(streamer, cfg, masks[0], masks[1], masks[2], inputs, inputs)

    def apply(self, index: int, layer: nn.Module) -> None:
        """Prune the still-dense ``layer`` and refit its consumers; advance both streams."""
        cfg = self.cfg
        dense_out, compressed_out, errors = reconstruct_at(
            index, layer, model_config(self.streamer.model), self.streamer.arch, self.attn_keep[index],
            self.mlp_keep[index], ridge_alphas(RIDGE_GRID if cfg.ridge is None else cfg.ridge), self.stats[index],
            self.dense.for_layer(index), self.compressed.for_layer(index),
            cfg.replacement_rank if cfg.replacement == "linear" else None,
        )  # fmt: skip
        self.dense, self.compressed = self.dense.passed_on(dense_out), self.compressed.passed_on(compressed_out)
        self.records.append(errors)


@dataclass
class LayerDistill:
    """Blockwise local distillation of a distill step, layer by layer (module docstring)."""

    cfg: DistillConfig
    ids: Tensor  # the step's training windows [samples, seq_len]
    seed: int
    dense: LayerInputs | None  # training windows through the dense layers (None: no BLD steps)
    compressed: LayerInputs | None  # ... through the compressed, distilled layers (inputs: compressed)
    targets: list[Tensor] = field(default_factory=list)
    records: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def start(cls, streamer: Streamer, cfg: DistillConfig, ids: Tensor, seed: int) -> LayerDistill:
        if cfg.global_steps > 0:
            raise ValueError("global KD does not stream (compress.stream.engine.not_streamable)")
        dense = streamer.capture(ids, cfg.batch_size) if cfg.steps > 0 else None
        return cls(cfg, ids, seed, dense, dense if dense is not None and cfg.inputs == "compressed" else None)

    def observe(self, index: int, layer: nn.Module) -> None:
        """Layer ``index`` is still dense: its outputs on the dense stream are the targets."""
        if self.dense is not None:
            clock = time.perf_counter()
            self.dense = self.dense.for_layer(index)
            self.targets = run_layer(layer, self.dense)
            self.seconds += time.perf_counter() - clock

    def apply(self, index: int, arch: Any, layer: nn.Module) -> None:
        """Train the compressed ``layer`` to reproduce the targets; advance the streams."""
        if self.dense is None:
            return
        clock = time.perf_counter()
        cfg = self.cfg
        settings = TrainSettings(cfg.steps, cfg.lr, cfg.train, cfg.lora_rank, cfg.weight_decay)
        compressed = self.compressed.for_layer(index) if self.compressed is not None else None
        record, compressed_out = distill_layer(
            index, layer, arch, self.dense, self.targets, compressed, settings, self.seed, cfg.inputs
        )
        self.dense = self.dense.passed_on(self.targets)
        if compressed is not None and compressed_out is not None:
            self.compressed = compressed.passed_on(compressed_out)
        self.targets = []
        self.records.append(record)
        self.seconds += time.perf_counter() - clock
        log.info("distill: layer %d block loss %.5f -> %.5f", index, record["loss_before"], record["loss_after"])

    def record(self, parent: str) -> dict[str, Any]:
        """The step's provenance record (as ``compress.recover.step.distill_step`` writes it in memory)."""
        return distill_record(self.cfg, parent, self.ids, self.records, [], self.seconds)
