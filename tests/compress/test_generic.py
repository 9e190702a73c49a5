"""A recipe on an architecture without an adapter (GPT-NeoX): quantize-only runs through the generic path and
reloads with plain ``AutoModelForCausalLM``; a step that needs an adapter is refused naming the step."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import quant  # noqa: F401  # registers the packed-checkpoint loader with transformers
from compress.generic import unadapted_architecture
from compress.pipeline import run
from quant.errors import InputError
from quant.qlinear import QuantLinear
from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("neox")
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=512, max_position_embeddings=128)  # fmt: skip
    config.architectures = ["GPTNeoXForCausalLM"]
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def _recipe(model_dir, out, steps):
    return {"model": str(model_dir), "steps": steps, "output": {"dir": str(out)}, "evaluation": None}


def test_quantize_only_recipe_on_an_architecture_without_adapter(neox_dir, tmp_path):
    assert unadapted_architecture(str(neox_dir)) == "GPTNeoXForCausalLM"
    result = run(_recipe(neox_dir, tmp_path / "out", [{"quantize": {"dtypes": "int8_sym", "group_size": 32}}]))
    packed = {n.split(".", 3)[-1] for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert packed == {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(result.checkpoint).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model(ids).logits)
    assert result.report["steps_summary"][0].startswith("quantize int8_sym g32")


def test_steps_that_need_an_adapter_are_refused(neox_dir, tmp_path):
    with pytest.raises(InputError, match=r"steps.0: GPTNeoXForCausalLM has no adapter"):
        run(_recipe(neox_dir, tmp_path / "out", [{"prune": {"ratio": 0.2}}]))
    with pytest.raises(InputError, match=r"steps.1: .*only quantize steps without calibration"):
        steps = [{"quantize": {"dtypes": "int8_sym"}}, {"quantize": {"dtypes": "int4_asym", "method": "gptq"}}]
        run(_recipe(neox_dir, tmp_path / "out2", steps))
