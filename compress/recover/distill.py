"""Distillation after compression: blockwise local distillation (Puzzle's BLD) and a short global KD.

BLD: every compressed decoder layer is trained to reproduce its dense parent's output. The parent's output on
the dense stream is the target; the student layer reads the dense stream (``inputs="dense"``, Puzzle's decoupled
BLD) or the compressed prefix's outputs (``inputs="compressed"``, which also corrects upstream error). Loss: the
normalised MSE of Puzzle, ‖s − t‖² / ‖t‖² per mini-batch. AdamW. One layer pair in memory at a time, the dense
targets computed once per layer by the calibration engine (``calibrate_paired``) and streamed on.

Global KD: the whole student is trained to match the dense model's next-token distribution,
KL(p_teacher ‖ p_student) at temperature T (Hinton et al.), decoder layers only (embeddings and head frozen).

Trainable parameters: ``all`` (every weight and bias of the layer's linears), ``consumers`` (o_proj and
down_proj), or ``lora`` (a rank-r update B·A per linear, B = 0 at the start, merged into the weights after).
Deterministic under ``seed`` (seeded generators; CPU kernels are deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.adapters import Arch, decoder_layers, linear_at, present_linears
from compress.calibration import LayerInputs, calibrate_paired, run_layer

Trainable = Literal["all", "consumers", "lora"]


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    train: Trainable = "all"
    lora_rank: int = 8
    weight_decay: float = 0.0


def normalized_mse(student: Tensor, target: Tensor) -> Tensor:
    """Puzzle's normalised MSE: Σ(s − t)² / Σt² (scalar; s, t: [..., hidden])."""
    return ((student - target) ** 2).sum() / (target**2).sum().clamp_min(1e-12)


def _linears(layer: nn.Module, arch: Arch, train: Trainable) -> list[nn.Linear]:
    present = present_linears(layer, arch)
    paths = [p for p in present if p in (arch.o, arch.down)] if train == "consumers" else list(present)
    return [linear_at(layer, p) for p in paths]


@contextmanager
def trainable(modules: list[nn.Module], arch: Arch, settings: TrainSettings, seed: int) -> Iterator[list[Tensor]]:
    """Yield the parameters to train in the decoder layers ``modules`` (requires_grad set only on them); for
    ``lora``, rank-r adapters hooked onto every linear and merged into its weight on exit."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    linears = [lin for m in modules for lin in _linears(m, arch, settings.train)]
    handles = []
    adapters: list[tuple[nn.Linear, Tensor, Tensor]] = []
    try:
        if settings.train == "lora":
            gen = torch.Generator().manual_seed(seed)
            for lin in linears:
                a = torch.randn(settings.lora_rank, lin.in_features, generator=gen) / math.sqrt(lin.in_features)
                a = a.to(lin.weight).requires_grad_(True)
                b = torch.zeros(lin.out_features, settings.lora_rank, dtype=lin.weight.dtype, device=a.device)
                b.requires_grad_(True)
                adapters.append((lin, a, b))
                handles.append(
                    lin.register_forward_hook(lambda _m, args, out, a=a, b=b: out + F.linear(F.linear(args[0], a), b))
                )
            params = [t for _, a, b in adapters for t in (a, b)]
        else:
            params = [q for lin in linears for q in lin.parameters()]
            for q in params:
                q.requires_grad_(True)
        yield params
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for lin, a, b in adapters:
                lin.weight.add_(b @ a)
        for p, flag in saved:
            p.requires_grad_(flag)


def _optimizer(params: list[Tensor], settings: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=False)


@torch.no_grad()
def block_loss(layer: nn.Module, inputs: LayerInputs, targets: list[Tensor]) -> float:
    """Normalised MSE of ``layer`` on all cached mini-batches (Σ over batches of the squared error / Σ t²)."""
    err, norm = 0.0, 0.0
    for out, t in zip(run_layer(layer, inputs), targets, strict=True):
        err += float(((out - t) ** 2).sum())
        norm += float((t**2).sum())
    return err / max(norm, 1e-12)


def train_block(
    layer: nn.Module,
    arch: Arch,
    inputs: LayerInputs,
    targets: list[Tensor],
    settings: TrainSettings,
    seed: int,
) -> tuple[float, float]:
    """BLD of one layer: ``settings.steps`` AdamW steps, each on one cached mini-batch drawn (seeded) at random.
    Returns the block loss (normalised MSE over all mini-batches) before and after."""
    before = block_loss(layer, inputs, targets)
    if settings.steps == 0:
        return before, before
    gen = torch.Generator().manual_seed(seed)
    order = torch.randint(len(targets), (settings.steps,), generator=gen).tolist()
    with trainable([layer], arch, settings, seed) as params, torch.enable_grad():
        if not params:  # both sub-blocks removed: nothing left to train (their constants stay as refitted)
            return before, before
        opt = _optimizer(params, settings)
        for b in order:
            out = layer(inputs.hidden[b], **inputs.kwargs[b])
            loss = normalized_mse(out[0] if isinstance(out, tuple) else out, targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return before, block_loss(layer, inputs, targets)


def distill_blocks(
    teacher: nn.Module,
    student: nn.Module,
    arch: Arch,
    input_ids: Tensor,
    settings: TrainSettings,
    seed: int,
    inputs: Literal["dense", "compressed"] = "dense",
    batch_size: int = 4,
    device: str | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> list[dict[str, float]]:
    """Blockwise local distillation of every decoder layer of ``student`` against ``teacher`` (module docstring).

    input_ids: [n, seq_len] training windows, cut into mini-batches of ``batch_size`` (one per step). Layer i
    trains with seed ``seed + i``. Returns per layer {"loss_before", "loss_after"} (normalised MSE).
    """
    records: list[dict[str, float]] = []

    def visit(
        index: int, parent: nn.Module, layer: nn.Module, dense_in: LayerInputs, compressed_in: LayerInputs
    ) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            targets = run_layer(parent, dense_in)
        record, compressed_out = distill_layer(
            index, layer, arch, dense_in, targets, compressed_in, settings, seed, inputs
        )
        records.append(record)
        if progress is not None:
            progress(index, record["loss_before"], record["loss_after"])
        assert compressed_out is not None
        return targets, compressed_out

    calibrate_paired(teacher, student, arch, input_ids, visit, batch_size, device, "block distillation")
    return records


def distill_layer(
    index: int,
    layer: nn.Module,
    arch: Arch,
    dense_in: LayerInputs,
    targets: list[Tensor],
    compressed_in: LayerInputs | None,
    settings: TrainSettings,
    seed: int,
    inputs: Literal["dense", "compressed"] = "dense",
) -> tuple[dict[str, float], list[Tensor] | None]:
    """Decoder layer ``index`` of :func:`distill_blocks` (in memory, or streamed by ``compress.stream``): train
    ``layer`` to reproduce ``targets`` (its dense parent's outputs on ``dense_in``) from ``dense_in`` or
    ``compressed_in`` (``inputs``), with seed ``seed + index``. Returns ({"loss_before", "loss_after"}, the
    trained layer's outputs on ``compressed_in``: the next layer's compressed inputs; None without it)."""
    source = dense_in if inputs == "dense" else compressed_in
    if source is None:
        raise ValueError("distill: inputs: compressed needs the compressed stream")
    before, after = train_block(layer, arch, source, targets, settings, seed + index)
    compressed_out = None
    if compressed_in is not None:
        with torch.no_grad():
            compressed_out = run_layer(layer, compressed_in)
    return {"loss_before": before, "loss_after": after}, compressed_out


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over tokens of T² · KL(softmax(t/T) ‖ softmax(s/T)); logits [..., vocab]."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def distill_global(
    teacher: nn.Module,
    student: nn.Module,
    arch: Arch,
    input_ids: Tensor,
    settings: TrainSettings,
    seed: int,
    batch_size: int = 4,
    temperature: float = 1.0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Global KD: ``settings.steps`` AdamW steps on seeded random mini-batches of ``batch_size`` windows of
    ``input_ids`` [n, seq_len], decoder layers only. Returns the loss of every step."""
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    layers = list(decoder_layers(student, arch))
    was_training = student.training
    student.eval()
    with trainable(layers, arch, settings, seed) as params, torch.enable_grad():
        opt = _optimizer(params, settings)
        for step in range(settings.steps):
            rows = torch.randperm(input_ids.shape[0], generator=gen)[:batch_size]
            ids = input_ids[rows].to(device)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            loss = kd_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    student.train(was_training)
    return losses
