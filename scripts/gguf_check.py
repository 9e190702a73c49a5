"""Run a GGUF export with llama.cpp (``llama-cpp-python``) and compare it with transformers on fixed prompts.

    .venv/bin/python scripts/gguf_check.py CHECKPOINT_DIR [--type f32] [--gguf FILE] [--json OUT.json]

Exports CHECKPOINT_DIR (unless ``--gguf`` names an existing export), then for each prompt: the tokenizations of
both sides, the next-token log-probabilities at every position (max |Δ log p| over positions and the whole
vocabulary; an f32 export should agree within 1e-3) and a greedy continuation from each side (tokens decoded one
at a time, argmax of the logits; the first position where they part, if any). Needs the binding:
``bash scripts/build_llama_cpp.sh``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "In the beginning God created the heavens and the earth. The earth was formless and empty.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
]


GGML_TYPES = {"f32": 0, "f16": 1}  # ggml_type ids of llama.cpp's KV-cache types


def llama_cpp_model(path: Path, n_ctx: int = 512, threads: int = 1, kv_cache: str = "f32"):
    """llama.cpp with its KV cache in ``kv_cache`` (llama.cpp defaults to f16, which alone moves log-probs by
    ~1e-2 on SmolLM2; f32 isolates the export itself)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama_cpp is not installed: run `bash scripts/build_llama_cpp.sh` first")
    kv = GGML_TYPES[kv_cache]
    return Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads, seed=0,
        type_k=kv, type_v=kv,
    )  # fmt: skip


def greedy_llama_cpp(llm, ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def greedy_transformers(model, ids: list[int], steps: int) -> list[int]:
    """Plain argmax decoding, like :func:`greedy_llama_cpp` (``generate`` with ``min_new_tokens`` would suppress the
    end-of-turn token that llama.cpp's argmax may pick, and the texts would part for that reason alone)."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(ids) :]


def check(folder: Path, gguf_path: Path, steps: int, kv_cache: str = "f32") -> dict:
    from compress.loading import load_model

    loaded = load_model(str(folder), dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    llm = llama_cpp_model(gguf_path, kv_cache=kv_cache)
    rows = []
    for prompt in PROMPTS:
        ids = [int(t) for t in tokenizer(prompt).input_ids]
        cpp_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        llm.reset()
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[: len(ids)])).double().log_softmax(-1)
        delta = (got - expected).abs()
        hf_tokens = greedy_transformers(model, ids, steps)
        cpp_tokens = greedy_llama_cpp(llm, ids, steps)
        parted = next((i for i, (a, b) in enumerate(zip(hf_tokens, cpp_tokens, strict=True)) if a != b), None)
        rows.append(
            {
                "prompt": prompt,
                "tokens": len(ids),
                "same_tokenization": list(cpp_ids) == ids,
                "max_abs_dlogprob": float(delta.max()),
                "max_abs_dlogprob_top1": float(delta.gather(1, expected.argmax(-1, keepdim=True)).max()),
                "greedy_transformers": tokenizer.decode(hf_tokens),
                "greedy_llama_cpp": tokenizer.decode(cpp_tokens),
                "greedy_first_difference": parted,
            }
        )
    return {"checkpoint": str(folder), "gguf": str(gguf_path), "prompts": rows,
            "max_abs_dlogprob": max(r["max_abs_dlogprob"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--gguf", type=Path, help="an existing export of CHECKPOINT (default: export it now)")
    parser.add_argument("--type", default="f32")
    parser.add_argument("--steps", type=int, default=24, help="greedy tokens per prompt")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--kv-cache", choices=sorted(GGML_TYPES), default="f32", help="llama.cpp's KV-cache type")
    args = parser.parse_args()
    gguf_path = args.gguf
    if gguf_path is None or not gguf_path.exists():
        from compress.export.gguf_writer import export_gguf

        clock = time.perf_counter()
        summary = export_gguf(args.checkpoint, gguf_path, args.type, overwrite=True)
        gguf_path = Path(summary["file"])
        print(f"exported {gguf_path} ({summary['architecture']}, {args.type}) in {time.perf_counter() - clock:.1f} s")
    result = check(args.checkpoint, gguf_path, args.steps, args.kv_cache)
    for row in result["prompts"]:
        print(f"\nprompt {row['prompt']!r}: {row['tokens']} tokens, same tokenization: {row['same_tokenization']}")
        print(
            f"  max |Δ log p| = {row['max_abs_dlogprob']:.2e} "
            f"(at the reference argmax {row['max_abs_dlogprob_top1']:.2e})"
        )
        print(f"  transformers greedy: {row['greedy_transformers']!r}")
        print(f"  llama.cpp greedy:    {row['greedy_llama_cpp']!r}")
        print(f"  first difference: {row['greedy_first_difference']}")
    print(f"\nmax |Δ log p| over all prompts: {result['max_abs_dlogprob']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
