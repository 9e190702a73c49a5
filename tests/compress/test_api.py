"""compress.prune / quantize / save on in-memory models: the docs example, recipe equivalence, unadapted archs."""

import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

import compress
import quant  # noqa: F401  # registers the packed-checkpoint loader with transformers
from compress.pipeline import run
from quant.errors import InputError
from quant.qlinear import QuantLinear
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny("llama").save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def test_docs_example_runs(model_dir, tmp_path, monkeypatch):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    code, n = re.subn(r'^path = .*$', f"path = {str(model_dir)!r}", code, flags=re.M)
    assert n == 1
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    out = tmp_path / "out" / "api-example"
    assert scope["out"] == Path("out/api-example") and (out / "model.safetensors").is_file()
    kinds = [next(iter(step)) for step in compress.history(scope["model"])["steps"]]
    assert kinds == ["prune", "quantize"]
    data = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert data["tags"] == ["secateurs", "pruned", "quantized", "structured-pruning"]
    assert "base_model" not in data  # a local folder is not a Hub id


def test_api_gives_the_same_model_as_the_recipe(model_dir, tmp_path):
    prune_cfg, quant_cfg = {"ratio": 0.3}, {"dtypes": "int4_asym", "group_size": 16}
    calibration = {"samples": 8, "seq_len": 32, "batch_size": 4}
    recipe = {
        "model": str(model_dir),
        "calibration": calibration,
        "steps": [{"prune": prune_cfg}, {"quantize": quant_cfg}],
        "output": {"dir": str(tmp_path / "recipe")},
        "evaluation": None,
    }
    expected = run(recipe).model.state_dict()
    from compress.loading import load_model

    loaded = load_model(str(model_dir))
    model = compress.prune(loaded.model, loaded.tokenizer, prune_cfg, calibration=calibration)
    compress.quantize(model, loaded.tokenizer, quant_cfg, batch_size=4)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    out = compress.save(model, loaded.tokenizer, tmp_path / "api")
    record = (out / "secateurs.json").read_text()
    assert '"ratio": 0.3' in record and '"tokens_sha256"' in record


def _tiny_opt():
    config = OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
        max_position_embeddings=128, word_embed_proj_dim=64,
    )  # fmt: skip
    config.architectures = ["OPTForCausalLM"]
    torch.manual_seed(0)
    return OPTForCausalLM(config).eval()


def test_quantize_only_for_an_architecture_without_adapter(tmp_path):
    model = _tiny_opt()
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    compress.quantize(model, tokenizer, {"dtypes": "int8_sym", "group_size": 32})
    packed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    linears = {f"model.decoder.layers.{i}.{p}" for i in range(2) for p in paths}
    assert packed == linears  # every decoder linear, and nothing outside the layers (embeddings, head)
    with torch.no_grad():
        quantized = model(ids).logits
    sqnr = 10 * torch.log10(dense.pow(2).mean() / (dense - quantized).pow(2).mean())
    assert sqnr > 25  # 8-bit weights: the logits barely move

    out = compress.save(model, tokenizer, tmp_path / "opt-int8", base_model="facebook/opt-125m")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized)
    data = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert data["base_model"] == "facebook/opt-125m" and data["base_model_relation"] == "quantized"
    assert data["tags"] == ["secateurs", "quantized"]


def test_conv1d_projections_are_refused(tmp_path):
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=512, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(InputError, match=r"no nn.Linear in transformer.h"):
        compress.quantize(model, build_tiny_tokenizer(tmp_path), {"dtypes": "int8_sym", "group_size": 16})


def test_a_typo_names_the_field():
    model = build_tiny("llama")
    with pytest.raises(InputError, match=r"compress.prune: field 'ratoi'"):
        compress.prune(model, None, {"ratoi": 0.2})
    with pytest.raises(InputError, match=r"field 'ratio'"):
        compress.prune(model, None, {"ratio": 1.5})


def test_recover_distills_against_the_dense_parent(model_dir):
    from compress.loading import load_model

    loaded = load_model(str(model_dir))
    model = compress.prune(loaded.model, loaded.tokenizer, {"ratio": 0.3}, calibration={"samples": 4, "seq_len": 32})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distill = {"data": "web:calibration", "samples": 4, "seq_len": 32, "batch_size": 2, "steps": 2}
    compress.recover(model, loaded.tokenizer, distill, teacher=str(model_dir))
    assert [next(iter(s)) for s in compress.history(model)["steps"]] == ["prune", "distill"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="dense parent"):
        compress.apply(model, loaded.tokenizer, "distill", distill)
