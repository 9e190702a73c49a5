"""Architecture adapters: the one place that knows module names and head layouts.

Every algorithm talks to a model through an :class:`Arch` looked up in :data:`ARCHS` by
``config.architectures[0]``. Adding an architecture is one table entry; no algorithm contains an ``if`` on a
model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from compress.remote.modeling_secateurs import SkippedSubBlock
from quant.errors import InputError


@dataclass(frozen=True)
class Arch:
    """Module names and attention layout of one decoder-only architecture.

    Attributes name sub-modules relative to the model (``layers``, ``embed``, ...) or relative to one decoder layer
    (``attn``, ``q`` ...). ``q``..``down`` are relative to the layer, e.g. ``"self_attn.q_proj"``.
    """

    name: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"  # the attention's pre-norm
    mlp_norm: str = "post_attention_layernorm"  # the MLP's pre-norm (Gemma: pre_feedforward_layernorm)
    # Norms on a sub-block's output before the residual add (Gemma's sandwich norms). FLAP's compensation acts on
    # o_proj / down_proj, i.e. before them; a removed sub-block's constant passes through them (they stay).
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # RMSNorm scale is (norm_offset + weight): 0 for Llama-style norms, 1 for Gemma's x/rms(x)·(1 + w). Whatever
    # folds a scale into a norm (AWQ) rescales (offset + w), not w.
    norm_offset: float = 0.0
    # Per-head modules applied after the q/k projections (Qwen3 and Gemma 3 q/k RMSNorm over head_dim): shared by
    # all heads, so head pruning leaves them untouched. Listed so that readers know they were considered.
    per_head_dim_modules: tuple[str, ...] = ()
    # Fused projections (Phi-3). ``qkv``: one linear whose output rows are [q (H·d) | k (G·d) | v (G·d)]; then
    # q/k/v name its row blocks, not modules. ``gate_up``: rows [gate (F) | up (F)]. Pruning slices the row blocks
    # together; quantization treats the fused linear as one linear.
    qkv: str | None = None
    gate_up: str | None = None
    # Conventions that live inside the modeling code and need no handling here, recorded for readers (GGUF export,
    # which re-implements the forward, refuses these architectures by name): embeddings scaled by sqrt(hidden),
    # tanh soft-capping of attention scores / final logits, per-layer sliding-window attention (the calibration
    # engine gives every layer its own mask and rotary table).
    embed_scale: bool = False
    softcap: bool = False
    sliding_window_layers: bool = False

    @property
    def attn_linears(self) -> tuple[str, ...]:
        return (self.qkv, self.o) if self.qkv else (self.q, self.k, self.v, self.o)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return (self.gate_up, self.down) if self.gate_up else (self.gate, self.up, self.down)

    @property
    def fused(self) -> bool:
        return bool(self.qkv or self.gate_up)

    @property
    def input_groups(self) -> list[tuple[str, ...]]:
        """Linears that read the same input tensor: attention inputs, o_proj, MLP inputs, down_proj."""
        return [self.attn_linears[:-1], (self.o,), self.mlp_linears[:-1], (self.down,)]

    @property
    def score_linears(self) -> tuple[str, ...]:
        """Linears whose outputs form the attention scores (q and k; the fused qkv as a whole)."""
        return (self.qkv,) if self.qkv else (self.q, self.k)

    @property
    def scale_producers(self) -> list[tuple[str, tuple[str, ...]]]:
        """(producer, consumers): where input-channel scales fold (AWQ). The pre-norms; v_proj into o_proj and
        up_proj into down_proj where they are separate modules (a fused producer is left out)."""
        pairs = [(self.attn_norm, self.attn_linears[:-1])]
        if not self.qkv:
            pairs.append((self.v, (self.o,)))
        pairs.append((self.mlp_norm, self.mlp_linears[:-1]))
        if not self.gate_up:
            pairs.append((self.up, (self.down,)))
        return pairs

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attn_linears + self.mlp_linears

    def sub_block(self, name: str) -> tuple[str, str]:
        """(block path, pre-norm path) of sub-block ``name`` ("attn" or "mlp") inside a decoder layer."""
        return (self.attn, self.attn_norm) if name == "attn" else (self.mlp, self.mlp_norm)

    @property
    def sub_blocks(self) -> dict[str, list[str]]:
        """What checkpoints record so that the remote loader can rebuild skipped sub-blocks."""
        return {name: list(self.sub_block(name)) for name in SUB_BLOCKS}


SUB_BLOCKS = ("attn", "mlp")


@dataclass(frozen=True)
class AttentionLayout:
    """Grouped-query attention layout of one layer.

    ``n_kv`` KV heads, each serving ``group`` query heads (g = H / G), head dimension ``head_dim``.
    Query head h belongs to KV group h // g (the ``repeat_kv`` convention of transformers).
    """

    n_kv: int
    group: int
    head_dim: int

    @property
    def n_q(self) -> int:
        return self.n_kv * self.group


ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("llama"),  # also SmolLM/SmolLM2, Llama-2/3
    "MistralForCausalLM": Arch("mistral"),
    "Qwen2ForCausalLM": Arch("qwen2"),  # q/k/v carry biases: surgery slices them with their rows
    "Qwen3ForCausalLM": Arch("qwen3", per_head_dim_modules=("self_attn.q_norm", "self_attn.k_norm")),
    # Gemma 2: sandwich norms (pre + post around each sub-block), RMSNorm (1 + w), embeddings × sqrt(hidden),
    # soft-capped attention scores and logits, alternating sliding-window / global layers, head_dim ≠ hidden / H
    "Gemma2ForCausalLM": Arch(
        "gemma2", mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm", norm_offset=1.0, embed_scale=True, softcap=True,
        sliding_window_layers=True,
    ),
    # Gemma 3 (text-only Gemma3ForCausalLM): Gemma 2's conventions without soft-capping, plus q/k RMSNorm over
    # head_dim and local (sliding, own rope base) / global layers
    "Gemma3ForCausalLM": Arch(
        "gemma3", mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm", norm_offset=1.0, embed_scale=True, sliding_window_layers=True,
        per_head_dim_modules=("self_attn.q_norm", "self_attn.k_norm"),
    ),
    # Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj [q | k | v] and gate_up_proj [gate | up]
    "Phi3ForCausalLM": Arch(
        "phi3", q="self_attn.qkv_proj[q]", k="self_attn.qkv_proj[k]", v="self_attn.qkv_proj[v]",
        gate="mlp.gate_up_proj[gate]", up="mlp.gate_up_proj[up]", qkv="self_attn.qkv_proj",
        gate_up="mlp.gate_up_proj",
    ),
}  # fmt: skip


def arch_for(config: object) -> Arch:
    """Look up the adapter for ``config.architectures[0]``; a clear error names the unsupported class."""
    names = getattr(config, "architectures", None) or []
    if not names or names[0] not in ARCHS:
        raise InputError(
            f"model architecture {names[0] if names else None!r} is not supported; "
            f"expected one of {sorted(ARCHS)} (config.architectures[0])"
        )
    return ARCHS[names[0]]


def require_separate_projections(arch: Arch, what: str) -> None:
    """One-line error for the steps that build q/k/v and gate/up as separate modules (NAS, Puzzle)."""
    if arch.fused:
        raise InputError(
            f"{what} does not support {arch.name}'s fused projections ({arch.qkv}, {arch.gate_up}); "
            "use prune (flap / wanda-sp / magnitude-sp) and quantize"
        )


def decoder_layers(model: nn.Module, arch: Arch) -> nn.ModuleList:
    layers = model.get_submodule(arch.layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def is_skipped(layer: nn.Module, arch: Arch, name: str) -> bool:
    """Whether sub-block ``name`` ("attn" or "mlp") of ``layer`` was removed (depth pruning)."""
    return isinstance(layer.get_submodule(arch.sub_block(name)[0]), SkippedSubBlock)


def skipped_sub_blocks(layer: nn.Module, arch: Arch) -> list[str]:
    return [name for name in SUB_BLOCKS if is_skipped(layer, arch, name)]


def present_linears(layer: nn.Module, arch: Arch) -> tuple[str, ...]:
    """Paths of the linears that ``layer`` still has (none of a skipped sub-block)."""
    attn = () if is_skipped(layer, arch, "attn") else arch.attn_linears
    mlp = () if is_skipped(layer, arch, "mlp") else arch.mlp_linears
    return attn + mlp


def attention_layout(config: object, layer: nn.Module, arch: Arch) -> AttentionLayout:
    """Read the (possibly pruned) GQA layout of ``layer`` from its weight shapes (``n_kv`` = 0 when skipped).

    Pruning keeps ``g`` query heads per KV head, so ``g`` comes from the base config and the counts from shapes.
    """
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)  # type: ignore[attr-defined]
    group = int(config.num_attention_heads // config.num_key_value_heads)  # type: ignore[attr-defined]
    if is_skipped(layer, arch, "attn"):
        n_kv = 0
    elif arch.qkv:  # rows [q | k | v] = (g + 2) · n_kv · head_dim
        n_kv = linear_shape(layer, arch.qkv)[0] // ((group + 2) * head_dim)
    else:
        n_kv = linear_shape(layer, arch.k)[0] // head_dim
    return AttentionLayout(n_kv=n_kv, group=group, head_dim=head_dim)


def linear_at(layer: nn.Module, path: str) -> nn.Linear:
    """The linear layer at dotted ``path`` inside ``layer`` (typed, with a clear error otherwise)."""
    module = layer.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{path} is a {type(module).__name__}, expected nn.Linear (prune before quantizing)")
    return module


def linear_shape(layer: nn.Module, path: str) -> tuple[int, int, bool]:
    """(out_features, in_features, has_bias) of a linear or packed linear at ``path`` inside ``layer``."""
    module: Any = layer.get_submodule(path)
    return int(module.out_features), int(module.in_features), getattr(module, "bias", None) is not None


def model_config(model: nn.Module) -> Any:
    """The Hugging Face config of ``model``."""
    return model.config


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the sub-module at dotted ``path`` (the inverse of ``get_submodule``)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
