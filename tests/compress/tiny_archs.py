"""Tiny random Gemma 2, Gemma 3 (text) and Phi-3 models built from configs in code (no network), with the
conventions that matter switched on: GQA (6 query / 3 KV heads), head_dim ≠ hidden / heads (Gemma), a sliding
window shorter than the test sequences (so sliding and global layers really see different masks), soft-capping
(Gemma 2), local and global rope bases and q/k norms (Gemma 3), fused qkv / gate_up (Phi-3). Norm weights are
random (Gemma's (1 + w) scaling then matters)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
)

BASE: dict[str, Any] = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=3,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
GEMMA: dict[str, Any] = dict(head_dim=16, sliding_window=8, layer_types=LAYER_TYPES, query_pre_attn_scalar=16)

FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {**GEMMA, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0},
    ),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(GEMMA)),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"sliding_window": None}),
}


def build_arch(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny fp32 model of ``family`` with random weights and random norm scales (deterministic under ``seed``)."""
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(**{**BASE, **extra, **overrides})
    config.architectures = [model_class.__name__]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.3)
    return model


def token_ids(n: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(seed))
