"""Damaged and tampered checkpoints: each class must give exit code 2 and one line naming the file or tensor from
``secateurs info`` / ``eval`` (no traceback, and never a model that silently computes garbage)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
O_BIAS = "model.layers.0.self_attn.o_proj.bias"  # FLAP bias compensation adds it
Q0 = "model.layers.0.self_attn.q_proj.weight"
PLANES = "model.layers.0.mlp.down_proj.weight"  # packed bit planes of a quantized linear


def write_reference(folder: Path) -> dict[str, Path]:
    """Two tiny Llama checkpoints: FLAP-pruned ("pruned") and pruned + MLPs quantized ("quantized")."""
    from compress.adapters import arch_for
    from compress.checkpoint import write_checkpoint
    from compress.prune.pruner import prune_model
    from compress.quantize import quantize_model
    from compress.recipe import PruneConfig, QuantizeConfig
    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    model = build_tiny("llama")
    arch = arch_for(model.config)
    calibration = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    # layer 0 loses a KV group (so FLAP adds o_proj.bias), layer 1 keeps all three (no o_proj.bias)
    prune_model(model, arch, PruneConfig(attn_keep=[0.67, 1.0], mlp_keep=[0.5, 0.75]), calibration, 2)
    out = {"pruned": write_checkpoint(model, tokenizer, arch, folder / "pruned", {"recipe": {}})}
    quantize_model(model, arch, QuantizeConfig(dtypes="bitmod4", group_size=16, modules=r"mlp\."), None)
    out["quantized"] = write_checkpoint(model, tokenizer, arch, folder / "quantized", {"recipe": {}})
    return out


def edit_json(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return apply


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None], rehash: bool) -> Callable[[Path], None]:
    """Rewrite the weights file; ``rehash``: also make secateurs.json agree (a tamperer who knows the format)."""

    def apply(folder: Path) -> None:
        from compress.checkpoint import tensor_hashes

        tensors = load_file(str(folder / WEIGHTS))
        change(tensors)
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
        if rehash:
            record = json.loads((folder / "secateurs.json").read_text())
            record["tensors"] = tensor_hashes(folder / WEIGHTS)
            (folder / "secateurs.json").write_text(json.dumps(record))

    return apply


def cut(name: str, keep: int) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep] if keep >= 0 else data[:keep])

    return apply


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def remove(*names: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return apply


def _set_layer(layer: int, path: str, value: list[int]) -> Callable[[dict[str, Any]], None]:
    return lambda c: c["secateurs_layers"][layer].__setitem__(path, value)


def _flip_bias(c: dict[str, Any]) -> None:
    c["secateurs_layers"][0]["self_attn.o_proj"][2] = 0


def _add_bias(c: dict[str, Any]) -> None:
    c["secateurs_layers"][1]["self_attn.o_proj"][2] = 1


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[Q0][0, 0] = float("nan")


def _tamper(t: dict[str, torch.Tensor]) -> None:
    t[Q0][3, 3] += 0.5


def _bits(c: dict[str, Any]) -> None:
    c["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"]["bits"] = 3


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable[[Path], None]
    needle: str  # what the error line must contain
    reference: str = "pruned"
    commands: tuple[str, ...] = ("info",)


DAMAGES = [
    Damage("config.json missing", remove("config.json"), "config.json"),
    Damage("config.json not JSON", write("config.json", b'{"architectures": [\n'), "config.json"),
    Damage("config.json a list", write("config.json", b"[]"), "config.json"),
    Damage(
        "unsupported architecture",
        edit_json("config.json", lambda c: c.__setitem__("architectures", ["GPT2LMHeadModel"])),
        "GPT2LMHeadModel",
    ),
    Damage(
        "architecture names a transformers attribute",
        edit_json("config.json", lambda c: c.__setitem__("architectures", ["AutoTokenizer"])),
        "AutoTokenizer",
    ),
    Damage(
        "layer width changed in config",
        edit_json("config.json", _set_layer(1, "mlp.up_proj", [40, 48, 0])),
        "model.layers.1.mlp.up_proj.weight",
    ),
    Damage("bias flag cleared in config", edit_json("config.json", _flip_bias), O_BIAS),
    Damage("bias flag set in config", edit_json("config.json", _add_bias), "model.layers.1.self_attn.o_proj.bias"),
    Damage(
        "layer list shortened",
        edit_json("config.json", lambda c: c["secateurs_layers"].pop()),
        "config.json",
    ),
    Damage(
        "sub-block marked skipped",
        edit_json("config.json", lambda c: c["secateurs_skipped"].__setitem__(0, ["attn"])),
        "config.json",
    ),
    Damage("secateurs.json missing", remove("secateurs.json"), "secateurs.json"),
    Damage("secateurs.json not JSON", write("secateurs.json", b"{"), "secateurs.json"),
    Damage(
        "secateurs.json without hashes",
        edit_json("secateurs.json", lambda r: r.pop("tensors")),
        "secateurs.json",
    ),
    Damage(
        "recorded hash changed",
        edit_json("secateurs.json", lambda r: r["tensors"].__setitem__(Q0, "0" * 64)),
        Q0,
        commands=("info", "eval"),
    ),
    Damage("tensor removed", edit_tensors(lambda t: t.pop(O_BIAS), rehash=True), O_BIAS, commands=("info", "eval")),
    Damage("tensor removed, still recorded", edit_tensors(lambda t: t.pop(O_BIAS), rehash=False), O_BIAS),
    Damage(
        "extra tensor",
        edit_tensors(lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), rehash=True),
        "model.extra.weight",
    ),
    Damage(
        "tensor renamed",
        edit_tensors(lambda t: t.__setitem__("model.layers.0.self_attn.q.weight", t.pop(Q0)), rehash=True),
        Q0,
    ),
    Damage(
        "tensor reshaped",
        edit_tensors(lambda t: t.__setitem__(Q0, t[Q0][:-8].clone()), rehash=True),
        Q0,
    ),
    Damage("tensor cast to fp16", edit_tensors(lambda t: t.__setitem__(Q0, t[Q0].half()), rehash=True), Q0),
    Damage("weight value tampered", edit_tensors(_tamper, rehash=False), Q0, commands=("info", "eval")),
    Damage("NaN weight, hashes updated", edit_tensors(_nan, rehash=True), Q0, commands=("info", "eval")),
    Damage("weights truncated", cut(WEIGHTS, -100), WEIGHTS, commands=("info", "eval")),
    Damage("weights header cut", cut(WEIGHTS, 5), WEIGHTS),
    Damage("weights empty", write(WEIGHTS, b""), WEIGHTS),
    Damage(
        "weights garbage", write(WEIGHTS, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64), WEIGHTS
    ),
    Damage("weights missing", remove(WEIGHTS), "safetensors"),
    Damage("tokenizer removed", remove("tokenizer.json", "tokenizer_config.json"), "tokenizer"),
    Damage(
        "quantized bits changed",
        edit_json("config.json", _bits),
        PLANES,
        reference="quantized",
    ),
    Damage(
        "quantized module dropped from config",
        edit_json("config.json", lambda c: c["quantization_config"]["modules"].pop("model.layers.0.mlp.down_proj")),
        "model.layers.0.mlp.down_proj",
        reference="quantized",
    ),
    Damage(
        "quantized planes tampered", edit_tensors(lambda t: t[PLANES].__ixor__(1), rehash=False), PLANES, "quantized"
    ),
]


@dataclass
class DamageResult:
    code: int
    lines: list[str]
    problem: str | None

    @property
    def line(self) -> str:
        return self.lines[0] if self.lines else ""


def run_damage(damage: Damage, references: dict[str, Path], work: Path, command: str = "info") -> DamageResult:
    """Copy the reference, damage it, run ``secateurs <command>`` on it in-process; judge the outcome."""
    from compress import cli

    folder = work / "ckpt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(references[damage.reference], folder)
    damage.apply(folder)
    argv = [command, str(folder)] + (["--tasks", "", "--ppl-windows", "2"] if command == "eval" else [])
    err, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("secateurs")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # what the CLI shows
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(argv)
    except Exception as exc:  # a traceback is exactly what must not happen
        return DamageResult(-1, [f"{type(exc).__name__}: {exc}"], f"raised {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    problem = None
    if code != 2:
        problem = f"exit code {code} (stdout {out.getvalue()[:120]!r})"
    elif len(lines) != 1:
        problem = f"{len(lines)} stderr lines: {lines[:3]}"
    elif damage.needle not in lines[0]:
        problem = f"error does not name {damage.needle!r}: {lines[0]}"
    return DamageResult(code, lines, problem)
