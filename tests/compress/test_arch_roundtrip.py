"""Gemma 2, Gemma 3 (text) and Phi-3 through pruning and quantization, each checked against an independent
reference: pruning equals masking the removed heads / channels in the dense model; FLAP's compensation keeps the
mean o_proj / down_proj output (before Gemma's post-norms) on the calibration batch, with the inputs taken from a
plain forward of the dense model (not from the calibration engine); ratio 0 changes nothing; prune + BitMoD →
save → a fresh process loading with ``AutoModelForCausalLM`` gives the same logits."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compress
from compress.adapters import arch_for, attention_layout, decoder_layers, linear_at
from compress.prune.pruner import apply_masks, collect_statistics, count_parameters, plan_masks, prune_model
from compress.recipe import PruneConfig
from quant.qlinear import QuantLinear
from tests.compress.tiny_archs import FAMILIES, build_arch, token_ids
from tests.tiny_tokenizer import build_tiny_tokenizer

CALIBRATION = token_ids(8, 32, seed=3)  # longer than the sliding window (8): sliding layers see other masks
COUNTS = {"attn_groups": [2, 1, 3], "mlp_channels": [64, 32, 96]}  # of 3 KV groups (GQA g = 2) and 96 channels
ROOT = Path(__file__).resolve().parents[2]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _masks(model: nn.Module, cfg: PruneConfig) -> tuple[list, list, list]:
    arch = arch_for(model.config)
    stats = collect_statistics(model, arch, CALIBRATION, batch_size=4)
    attn, mlp = plan_masks(model, arch, cfg, stats)
    return stats, attn, mlp


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_equals_masking_the_dense_model(family):
    """No compensation: the pruned model computes what the dense model computes with the removed heads' o_proj
    columns and the removed channels' down_proj columns set to zero (so fused rows were sliced consistently)."""
    model = build_arch(family)
    arch = arch_for(model.config)
    cfg = PruneConfig(**COUNTS, bias_compensation=False)
    stats, attn, mlp = _masks(model, cfg)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, a_keep, m_keep in zip(decoder_layers(reference, arch), attn, mlp, strict=True):
            layout = attention_layout(reference.config, layer, arch)
            q_cols = a_keep.repeat_interleave(layout.group * layout.head_dim)  # query head h in KV group h // g
            linear_at(layer, arch.o).weight[:, ~q_cols] = 0
            linear_at(layer, arch.down).weight[:, ~m_keep] = 0
    apply_masks(model, arch, cfg, stats, attn, mlp)
    assert [int(a.sum()) for a in attn] == COUNTS["attn_groups"]
    assert count_parameters(model) < count_parameters(reference)
    ids = token_ids()
    assert float((_logits(model, ids) - _logits(reference, ids)).abs().max()) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compensation_keeps_the_mean_output_before_the_post_norm(family):
    model = build_arch(family)
    arch = arch_for(model.config)
    inputs: dict[str, list[torch.Tensor]] = {}

    def keep_input(key: str):
        return lambda _m, args: inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [
        linear_at(layer, path).register_forward_pre_hook(keep_input(f"{i}.{path}"))
        for i, layer in enumerate(decoder_layers(model, arch))
        for path in (arch.o, arch.down)
    ]
    _logits(model, CALIBRATION)  # one plain forward of the dense model: the independent inputs
    for h in hooks:
        h.remove()
    dense = copy.deepcopy(model)
    cfg = PruneConfig(**COUNTS)
    stats, attn, mlp = _masks(model, cfg)
    apply_masks(model, arch, cfg, stats, attn, mlp)
    pairs = zip(decoder_layers(dense, arch), decoder_layers(model, arch), strict=True)
    for i, (dense_layer, layer) in enumerate(pairs):
        layout = attention_layout(dense.config, dense_layer, arch)
        for path, keep in ((arch.o, attn[i].repeat_interleave(layout.group * layout.head_dim)), (arch.down, mlp[i])):
            x = torch.cat(inputs[f"{i}.{path}"]).double()
            before, after = linear_at(dense_layer, path), linear_at(layer, path)
            expected = (x @ before.weight.double().T).mean(0)
            bias = after.bias.double() if after.bias is not None else 0
            got = (x[:, keep] @ after.weight.double().T).mean(0) + bias
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), f"layer {i} {path}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ratio_zero_leaves_logits_unchanged(family):
    model = build_arch(family)
    ids = token_ids()
    dense = _logits(model, ids)
    prune_model(model, arch_for(model.config), PruneConfig(ratio=0.0), CALIBRATION, batch_size=4)
    assert torch.equal(_logits(model, ids), dense)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flap_bitmod_save_fresh_process_reload(family, tmp_path):
    model = build_arch(family)
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    compress.prune(model, tokenizer, {"method": "flap", **COUNTS}, calibration=CALIBRATION, batch_size=4)
    compress.quantize(model, tokenizer, {"dtypes": "bitmod4", "group_size": 16})
    arch = arch_for(model.config)
    packed = {n.split(".", 3)[-1] for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert packed == set(arch.linears)  # fused qkv_proj / gate_up_proj are packed as whole linears
    out = compress.save(model, tokenizer, tmp_path / "ckpt")
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids, use_cache=False).logits, {str(tmp_path / 'got.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    assert float((got - _logits(model, ids)).abs().max()) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_run_equals_the_in_memory_run(family, tmp_path):
    """Layer streaming (meta skeleton; Gemma's non-persistent embedding scale and rotary tables must survive the
    embeddings being freed) writes the same weights as the in-memory run."""
    from compress.pipeline import run

    folder = tmp_path / "model"
    build_arch(family).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    steps = [{"prune": {"ratio": 0.3}}, {"quantize": {"dtypes": "bitmod4", "group_size": 16}}]
    weights = []
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        run({"model": str(folder), "stream": stream, "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
             "steps": steps, "output": {"dir": str(out)}, "evaluation": None})  # fmt: skip
        weights.append((out / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
