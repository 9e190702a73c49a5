"""An offline tiny tokenizer (and matching tiny Llama) for tests.

``build_tiny_tokenizer(tmp_dir)`` trains a byte-level BPE tokenizer with a vocabulary of exactly
``TINY_VOCAB_SIZE`` (= 512, the ``vocab_size`` of the tiny models in ``tests/conftest.py``) on the first
``TRAIN_DOCS`` documents of the shipped calibration corpus, wraps it in ``PreTrainedTokenizerFast`` with
``<s>``/``</s>``/``<unk>``/``<pad>`` and saves it to ``tmp_dir`` (so
``AutoTokenizer.from_pretrained(tmp_dir)`` and ``lm_eval --model_args pretrained=tmp_dir`` work). Byte-level:
any text round-trips, no ``<unk>`` in practice. Training is deterministic and takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from compress.corpus import load_documents

TINY_VOCAB_SIZE = 512
TRAIN_DOCS = 60
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3


def build_tiny_tokenizer(tmp_dir: str | Path, model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Train, wrap and save (to ``tmp_dir``) a 512-token byte-level BPE tokenizer; return the wrapped one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_documents("web:calibration")[:TRAIN_DOCS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(tmp_dir))
    return fast


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, tmp_dir: str | Path | None = None):
    """A random 2-layer Llama (hidden 64) sized to ``tokenizer``; also saved to ``tmp_dir`` if given."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if tmp_dir is not None:
        model.save_pretrained(str(tmp_dir))
    return model
