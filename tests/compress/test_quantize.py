"""Quantize step: packed layers, mixed precision, checkpoints that reload (also pruned + quantized)."""

import json
import subprocess
import sys

import pytest
import torch

from compress.adapters import arch_for, set_submodule
from compress.checkpoint import load_checkpoint_model, write_checkpoint
from compress.prune.pruner import count_parameters, prune_model
from compress.quantize import awq_pairs, fold_scales, quant_linears, quantize_model, weight_storage
from compress.recipe import PruneConfig, QuantizeConfig, parse_recipe
from quant.errors import InputError
from quant.quantize import quantize_linear
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


def test_ex2_weighted_choice_runs_and_differs():
    plain, aware = build_tiny("llama"), build_tiny("llama")
    arch = arch_for(plain.config)
    quantize_model(plain, arch, QuantizeConfig(dtypes="bitmod3", group_size=16), None)
    quantize_model(aware, arch, QuantizeConfig(dtypes="bitmod3", group_size=16, type_choice="ex2_weighted"), _ids(), 2)
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


@pytest.mark.parametrize(("family", "overrides"), [("llama", {"num_key_value_heads": 6}), ("qwen2", {})])
def test_awq_scales_folded_into_the_producers_leave_the_float_model_unchanged(family, overrides, token_batch):
    model = build_tiny(family, **overrides)
    arch = arch_for(model.config)
    with torch.no_grad():
        before = model(input_ids=token_batch).logits
        g = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            for producer, consumers in awq_pairs(arch):
                linears = [layer.get_submodule(p) for p in consumers]
                width = layer.get_submodule(producer).weight.shape[0]
                if any(lin.in_features != width for lin in linears):
                    continue  # GQA v→o (not foldable), as the quantize step skips it
                fold_scales(layer.get_submodule(producer), linears, torch.rand(width, generator=g) * 3 + 0.2)
        after = model(input_ids=token_batch).logits
    assert float((after - before).abs().max()) <= 1e-4
    changed = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(changed, build_tiny(family, **overrides).model.layers[0].input_layernorm.weight)


def test_error_compensating_methods_pack_every_linear_and_reload_in_a_fresh_process(tokenizer, tmp_path, token_batch):
    model = build_tiny("llama")
    arch = arch_for(model.config)
    cfg = QuantizeConfig(dtypes="bitmod4", group_size=16, method="awq+gptq", scale_bits=8, awq_grid=4, awq_tokens=64)
    record = quantize_model(model, arch, cfg, _ids(), 2)
    assert len(record) == 14 and len(quant_linears(model)) == 14
    out = write_checkpoint(model, tokenizer, arch, tmp_path / "ckpt", {"recipe": {}})
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format_version"] == 2
    spec = qconfig["modules"]["model.layers.0.mlp.down_proj"]
    assert spec["storage"] == {"type_id_bits": 2, "scale_bits": 8, "zero_bits": None, "tables": "registry"}
    storage = weight_storage(model)
    in_memory = sum(t.numel() * t.element_size() for m in quant_linears(model).values() for n, t in m.named_buffers()
                    if n != "bias")  # fmt: skip
    assert storage["bits_per_weight"] < 8 * in_memory / storage["quantized_weights"]
    torch.save(token_batch, tmp_path / "ids.pt")
    code = (
        "import torch\nfrom transformers import AutoModelForCausalLM\nimport quant\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model(input_ids=token_batch).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


def test_gptq_lowers_the_output_error_on_its_calibration_data_against_rtn():
    dense = build_tiny("llama")
    arch = arch_for(dense.config)
    ids = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(3))
    errors = {}
    for method in ("rtn", "gptq"):
        model = build_tiny("llama")
        quantize_model(model, arch, QuantizeConfig(dtypes="int3_asym", group_size=16, method=method), ids, 8)
        with torch.no_grad():
            diff = model(input_ids=ids).logits - dense(input_ids=ids).logits
            errors[method] = float(diff.square().mean())
    assert errors["gptq"] < errors["rtn"]


def test_old_format_checkpoint_still_loads(tokenizer, tmp_path, token_batch):
    """Format version 1 = the in-memory layout verbatim and no ``storage`` entries (what earlier releases wrote)."""
    model = build_tiny("llama")
    arch = arch_for(model.config)
    for index, layer in enumerate(model.model.layers):
        for path in arch.linears:  # the old quantize step: plain modules, no compact-storage hook
            set_submodule(layer, path, quantize_linear(layer.get_submodule(path), "bitmod4", 16))
            quant_linears(model)[f"model.layers.{index}.{path}"].dtypes = "bitmod4"
    out = write_checkpoint(model, tokenizer, arch, tmp_path / "ckpt", {"recipe": {}})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    assert not any("storage" in spec for spec in config["quantization_config"]["modules"].values())
    (out / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        diff = load_checkpoint_model(out)(input_ids=token_batch).logits - model(input_ids=token_batch).logits
    assert float(diff.abs().max()) == 0.0


def test_quantize_options_validate():
    old = QuantizeConfig.model_validate({"activation_aware": True})
    assert old.type_choice == "ex2_weighted" and old.activation_aware
    assert QuantizeConfig(method="gptq").activation_aware and not QuantizeConfig().activation_aware
    with pytest.raises(InputError, match=r"steps\.0\.quantize\.method"):
        parse_recipe({"steps": [{"quantize": {"method": "omniquant"}}]})
    with pytest.raises(InputError, match="scale_bits: 8-bit scales are not available for mxfp4"):
        quantize_model(build_tiny("llama"), arch_for(build_tiny("llama").config),
                       QuantizeConfig(dtypes="mxfp4", group_size=32, scale_bits=8), None)  # fmt: skip
