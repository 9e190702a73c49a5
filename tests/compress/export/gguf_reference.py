"""An independent torch forward of llama.cpp's ``llama`` / ``deci`` graphs, read from a GGUF file.

Written from llama.cpp ``src/models/deci.cpp`` (including its ``n_ff == 0`` → ``continue``, which drops the
layer's attention output) and the GGUF conventions (interleaved RoPE pairs, [in, out] tensor dims); float64.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import torch
import torch.nn.functional as F


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _per_layer(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n


def read_gguf(path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    n = int(_field(reader, f"{arch}.block_count"))
    hp = {
        "arch": arch,
        "n_layer": n,
        "n_head": _per_layer(_field(reader, f"{arch}.attention.head_count"), n),
        "n_kv": _per_layer(_field(reader, f"{arch}.attention.head_count_kv"), n),
        "n_ff": _per_layer(_field(reader, f"{arch}.feed_forward_length"), n),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length")),
        "eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "base": float(_field(reader, f"{arch}.rope.freq_base")),
    }
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float64).reshape(shape))
    return hp, tensors


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x: [T, heads, d], pairs (2i, 2i+1) rotated by pos·base^(−2i/d)."""
    t, _, d = x.shape
    theta = torch.arange(t, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def _linear(x: torch.Tensor, tensors: dict, name: str) -> torch.Tensor:
    y = x @ tensors[f"{name}.weight"].T
    bias = tensors.get(f"{name}.bias")
    return y if bias is None else y + bias


def reference_logits(path, ids: list[int]) -> torch.Tensor:
    """[T, vocab] logits of the GGUF model at ``path`` for one sequence ``ids``."""
    hp, w = read_gguf(path)
    x = w["token_embd.weight"][torch.tensor(ids)]
    d = hp["head_dim"]
    mask = torch.full((len(ids), len(ids)), float("-inf"), dtype=torch.float64).triu(1)
    for il in range(hp["n_layer"]):
        blk, n_head, n_kv, n_ff = f"blk.{il}", hp["n_head"][il], hp["n_kv"][il], hp["n_ff"][il]
        inp = x
        cur = x
        if n_head > 0:
            h = _rms(x, w[f"{blk}.attn_norm.weight"], hp["eps"])
            q = _rope(_linear(h, w, f"{blk}.attn_q").reshape(len(ids), n_head, d), hp["base"])
            k = _rope(_linear(h, w, f"{blk}.attn_k").reshape(len(ids), n_kv, d), hp["base"])
            v = _linear(h, w, f"{blk}.attn_v").reshape(len(ids), n_kv, d)
            group = n_head // n_kv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
            att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(ids), n_head * d)
            cur = _linear(att, w, f"{blk}.attn_output")
        if n_ff == 0:
            continue  # llama.cpp: the layer's output is its input (an attention output is dropped)
        ffn_inp = cur + inp if n_head > 0 else cur
        h = _rms(ffn_inp, w[f"{blk}.ffn_norm.weight"], hp["eps"])
        act = F.silu(_linear(h, w, f"{blk}.ffn_gate")) * _linear(h, w, f"{blk}.ffn_up")
        x = _linear(act, w, f"{blk}.ffn_down") + ffn_inp
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], hp["eps"]) @ head.T
