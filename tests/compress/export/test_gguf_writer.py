"""GGUF export of tiny plain / pruned / depth-pruned Llamas: names and per-layer metadata read back with the gguf
reader, numbers checked against an independent forward of llama.cpp's graph (``gguf_reference``), and through
llama.cpp itself when its Python binding is installed (``scripts/build_llama_cpp.sh``)."""

import gguf
import pytest
import torch

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.export.gguf_writer import write_gguf
from compress.prune.surgery import remove_kv_groups, remove_mlp_channels, skip_block
from quant.errors import InputError
from tests.compress.export.gguf_reference import read_gguf, reference_logits
from tests.conftest import build_tiny

SHAPE = dict(
    num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=8
)
IDS = [1, 17, 300, 42, 9, 250, 77, 5, 120, 33, 64, 2]


def _model(seed: int = 0) -> torch.nn.Module:
    return build_tiny("llama", seed=seed, **SHAPE)


def _per_layer_model() -> torch.nn.Module:
    """Layer 1: 3 of 4 KV groups; layer 2: MLP width 64; layer 3: attention skipped (constant); all compensated."""
    model = _model()
    arch = arch_for(model.config)
    layers = decoder_layers(model, arch)
    g = torch.Generator().manual_seed(5)
    layout = attention_layout(model.config, layers[1], arch)
    remove_kv_groups(layers[1], arch, layout, torch.tensor([True, False, True, True]), torch.randn(64, generator=g))
    keep = torch.zeros(128, dtype=torch.bool)
    keep[torch.randperm(128, generator=g)[:64]] = True
    remove_mlp_channels(layers[2], arch, keep, torch.randn(128, generator=g))
    skip_block(layers[3], arch, "attn", torch.randn(64, generator=g))
    return model


def _skipped_model() -> torch.nn.Module:
    """Layer 1: MLP skipped next to a kept attention; layer 2: both skipped; layer 3: attention skipped."""
    model = _model()
    arch = arch_for(model.config)
    layers = decoder_layers(model, arch)
    g = torch.Generator().manual_seed(6)
    skip_block(layers[1], arch, "mlp", torch.randn(128, generator=g))
    skip_block(layers[2], arch, "attn", torch.randn(64, generator=g))
    skip_block(layers[2], arch, "mlp", torch.randn(128, generator=g))
    skip_block(layers[3], arch, "attn", torch.randn(64, generator=g))
    return model


def _hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0].double()


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")}


def test_plain_model_is_written_as_llama_with_scalar_counts(tiny4_dir, tmp_path):
    model = _model()
    out = tmp_path / "plain.gguf"
    summary = write_gguf(model, tiny4_dir, out, "f32")
    fields = _fields(out)
    assert summary["architecture"] == fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 8 and fields["llama.attention.head_count_kv"] == 4
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.block_count"] == 4
    hp, tensors = read_gguf(out)
    assert "output.weight" not in tensors  # tied embeddings
    assert {"token_embd.weight", "output_norm.weight", "blk.3.ffn_down.weight"} <= set(tensors)
    v = model.model.layers[0].self_attn.v_proj.weight.double()
    assert torch.equal(tensors["blk.0.attn_v.weight"], v)
    assert float((reference_logits(out, IDS) - _hf_logits(model)).abs().max()) < 1e-4


def test_tokenizer_and_template_are_carried_over(tiny4_dir, tmp_path):
    out = tmp_path / "plain.gguf"
    write_gguf(_model(), tiny4_dir, out, "f16")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 512 and tokens[1] == "<s>"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0


def test_per_layer_shapes_use_deci_arrays_and_fold_the_skipped_constant(tiny4_dir, tmp_path):
    model = _per_layer_model()
    out = tmp_path / "pruned.gguf"
    summary = write_gguf(model, tiny4_dir, out, "f32")
    fields = _fields(out)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [8, 6, 8, 0]
    assert fields["deci.attention.head_count_kv"] == [4, 3, 4, 0]
    assert fields["deci.feed_forward_length"] == [128, 128, 64, 128]
    _, tensors = read_gguf(out)
    assert "blk.3.attn_q.weight" not in tensors and "blk.3.attn_norm.weight" not in tensors
    layers = model.model.layers
    expected = layers[2].mlp.down_proj.bias.double() + layers[3].self_attn.bias.double()
    assert torch.allclose(tensors["blk.2.ffn_down.bias"], expected)
    assert any("layer 3's skipped attention" in note for note in summary["notes"])
    assert float((reference_logits(out, IDS) - _hf_logits(model)).abs().max()) < 1e-4


def test_skipped_mlp_next_to_attention_becomes_a_zero_stub(tiny4_dir, tmp_path):
    model = _skipped_model()
    out = tmp_path / "skipped.gguf"
    write_gguf(model, tiny4_dir, out, "f32")
    fields = _fields(out)
    assert fields["deci.attention.head_count"] == [8, 8, 0, 0]
    assert fields["deci.feed_forward_length"] == [128, 1, 0, 128]
    _, tensors = read_gguf(out)
    assert not tensors["blk.1.ffn_down.weight"].any()
    assert float((reference_logits(out, IDS) - _hf_logits(model)).abs().max()) < 1e-4


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_types_stay_close(tiny4_dir, tmp_path, type_name):
    model = _per_layer_model()
    out = tmp_path / f"{type_name}.gguf"
    summary = write_gguf(model, tiny4_dir, out, type_name)
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    assert summary["tensor_types"]["blk.0.attn_q.weight"] == qtype.name
    assert summary["tensor_types"]["blk.0.attn_norm.weight"] == "F32"
    logp = reference_logits(out, IDS).log_softmax(-1)
    expected = _hf_logits(model).log_softmax(-1)
    tolerance = {"f16": 0.02, "bf16": 0.1, "q8_0": 0.1, "q4_0": 1.0}[type_name]
    assert float((logp - expected).abs().max()) < tolerance


def test_refusals_name_the_problem(tiny4_dir, tmp_path):
    model = _model()
    skip_block(model.model.layers[0], arch_for(model.config), "attn", None)
    with pytest.raises(InputError, match="layer 0"):
        write_gguf(model, tiny4_dir, tmp_path / "x.gguf", "f32")
    with pytest.raises(InputError, match="--type"):
        write_gguf(_model(), tiny4_dir, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(InputError, match="architectures"):
        write_gguf(build_tiny("qwen2"), tiny4_dir, tmp_path / "x.gguf", "f32")
    assert not any(tmp_path.iterdir())


def test_llama_cpp_agrees_when_installed(tiny4_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, model in (("plain", _model()), ("pruned", _per_layer_model()), ("skipped", _skipped_model())):
        out = tmp_path / f"{name}.gguf"
        write_gguf(model, tiny4_dir, out, "f32")
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        llm.eval(IDS)
        got = torch.from_numpy(llm.scores[: len(IDS)].copy()).double().log_softmax(-1)
        expected = _hf_logits(model).log_softmax(-1)
        assert float((got - expected).abs().max()) < 1e-3, name
