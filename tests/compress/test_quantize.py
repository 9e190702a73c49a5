"""Quantize step: packed layers, mixed precision, checkpoints that reload (also pruned + quantized)."""

import json
import subprocess
import sys

import pytest
import torch

from compress.adapters import arch_for
from compress.checkpoint import load_checkpoint_model, write_checkpoint
from compress.prune.pruner import count_parameters, prune_model
from compress.quantize import quant_linears, quantize_model, weight_storage
from compress.recipe import PruneConfig, QuantizeConfig, parse_recipe
from quant.errors import InputError
from quant.select import quantize_dequantize
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(7))


def test_every_decoder_linear_is_packed_and_matches_fake_quant(token_batch):
    model = build_tiny("llama")
    reference = build_tiny("llama")
    arch = arch_for(model.config)
    quantize_model(model, arch, QuantizeConfig(dtypes="bitmod4", group_size=16), None)
    packed = quant_linears(model)
    assert len(packed) == 2 * 7 and all(m.bits == 4 for m in packed.values())
    with torch.no_grad():  # independent path: fake-quantise the reference weights in place
        for name in packed:
            linear = reference.get_submodule(name)
            linear.weight.copy_(quantize_dequantize(linear.weight, "bitmod4", 16))
        diff = (model(input_ids=token_batch).logits - reference(input_ids=token_batch).logits).abs().max()
    assert float(diff) <= 1e-5
    assert count_parameters(model) == count_parameters(reference)


def test_mixed_precision_overrides_and_module_filter():
    model = build_tiny("qwen2")
    cfg = QuantizeConfig(
        dtypes="bitmod4",
        group_size=16,
        modules=r"mlp\.",
        overrides=[{"match": r"layers\.1\..*down_proj", "dtypes": "bitmod3", "group_size": 32}],
    )
    record = quantize_model(model, arch_for(model.config), cfg, None)
    assert set(record) == {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}
    down = model.get_submodule("model.layers.1.mlp.down_proj")
    assert (down.bits, down.group_size) == (3, 32)
    assert model.get_submodule("model.layers.0.mlp.down_proj").bits == 4


def test_activation_aware_choice_runs_and_differs():
    plain, aware = build_tiny("llama"), build_tiny("llama")
    arch = arch_for(plain.config)
    quantize_model(plain, arch, QuantizeConfig(dtypes="bitmod3", group_size=16), None)
    quantize_model(aware, arch, QuantizeConfig(dtypes="bitmod3", group_size=16, activation_aware=True), _ids(), 2)
    ids = [
        (a.type_ids != b.type_ids).any()
        for a, b in zip(quant_linears(plain).values(), quant_linears(aware).values(), strict=True)
    ]
    assert any(bool(x) for x in ids)


def test_bad_quantize_settings_name_the_field():
    with pytest.raises(InputError, match=r"steps\.0\.quantize\.dtypes"):
        parse_recipe({"steps": [{"quantize": {"dtypes": "int5"}}]})
    with pytest.raises(InputError, match="steps.1: prune and nas steps must come before quantize"):
        parse_recipe({"steps": [{"quantize": {}}, {"prune": {}}]})


def test_pruned_and_quantized_checkpoint_reloads_in_a_fresh_process(tokenizer, tmp_path, token_batch):
    model = build_tiny("llama")
    arch = arch_for(model.config)
    prune_model(model, arch, PruneConfig(ratio=0.3), _ids(), 2)
    quantize_model(model, arch, QuantizeConfig(dtypes="bitmod4", group_size=16), None)
    out = write_checkpoint(model, tokenizer, arch, tmp_path / "ckpt", {"recipe": {}})
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "secateurs_bitmod"
    # the file holds what we report: packed tensors at the reported bits/weight plus the unquantized rest
    storage = weight_storage(model)
    packed_bytes = storage["bits_per_weight"] * storage["quantized_weights"] / 8
    other_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    other_bytes += sum(
        m.bias.numel() * m.bias.element_size() for m in quant_linears(model).values() if m.bias is not None
    )
    size = (out / "model.safetensors").stat().st_size
    assert packed_bytes + other_bytes <= size <= packed_bytes + other_bytes + 64 * 1024  # + safetensors header
    reloaded = load_checkpoint_model(out)
    with torch.no_grad():
        expected = model(input_ids=token_batch).logits
        assert float((reloaded(input_ids=token_batch).logits - expected).abs().max()) <= 1e-5
    torch.save(token_batch, tmp_path / "ids.pt")
    code = (
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float((torch.load(tmp_path / "logits.pt", weights_only=True) - expected).abs().max()) <= 1e-4


def test_load_without_registration_fails_loudly_and_with_it_works(tokenizer, tmp_path, token_batch):
    model = build_tiny("llama")
    arch = arch_for(model.config)
    quantize_model(model, arch, QuantizeConfig(dtypes="int4_asym", group_size=16), None)
    out = write_checkpoint(model, tokenizer, arch, tmp_path / "ckpt", {"recipe": {}})
    plain = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(out)!r})\n"
    done = subprocess.run([sys.executable, "-c", plain], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0 and "mismatch" in done.stderr
    registered = "import quant\n" + plain + "print('ok')\n"
    done = subprocess.run([sys.executable, "-c", registered], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_dequantized_export_loads_as_plain_model(tokenizer, tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = build_tiny("mistral")
    arch = arch_for(model.config)
    quantize_model(model, arch, QuantizeConfig(dtypes="nf4", group_size=16), None)
    out = write_checkpoint(model, tokenizer, arch, tmp_path / "ckpt", {"recipe": {}}, export="dequantized")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        diff = (plain(input_ids=token_batch).logits - model(input_ids=token_batch).logits).abs().max()
    assert float(diff) <= 1e-5
    assert quant_linears(model)  # the in-memory model stays packed
