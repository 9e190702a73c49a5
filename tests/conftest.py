"""Shared fixtures: tiny randomly initialised decoder models built from configs in code (no network)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=8,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def build_tiny(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny fp32 model of ``family`` with random weights (deterministic under ``seed``)."""
    config_class, model_class = FAMILIES[family]
    config = config_class(**{**TINY, **overrides})
    config.architectures = [model_class.__name__]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # random biases so that Qwen2's q/k/v bias slicing is really exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """A test that takes ``device`` runs on the CPU, and once more on CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(params=sorted(FAMILIES))
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build_tiny(request.param)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


@pytest.fixture
def token_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (4, 24), generator=g)


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory: pytest.TempPathFactory):
    """A saved 4-layer tiny Llama with a tokenizer: a model folder for recipes (nas, session, search tests)."""
    from tests.tiny_tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny4")
    build_tiny("llama", num_hidden_layers=4).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder
