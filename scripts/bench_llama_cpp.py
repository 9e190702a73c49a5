"""llama.cpp decode speed: pruned vs dense GGUF, measured in one run (ratio of time per token).

    .venv/bin/python scripts/bench_llama_cpp.py --dense DENSE.gguf --pruned A.gguf [B.gguf …] [--tokens 128]

Each model decodes ``--tokens`` tokens one at a time (greedy, after a fixed prompt); the rounds alternate between
the models (dense, pruned, dense, …) so that a change in machine load hits all of them alike, and the median time
per token over the rounds is reported with its ratio to the dense model. Goal for FLAP-20: ≤ 0.85× the dense time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = [1, 504, 3458, 282, 4649, 314]  # a few SmolLM2 tokens; the ids only need to exist


def decode_seconds_per_token(llm, tokens: int) -> float:
    llm.reset()
    llm.eval(PROMPT)
    clock = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    return (time.perf_counter() - clock) / tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--pruned", type=Path, nargs="+", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama_cpp is not installed: run `bash scripts/build_llama_cpp.sh` first")
    paths = [args.dense, *args.pruned]
    models = [
        Llama(model_path=str(p), n_ctx=512, logits_all=True, verbose=False, n_threads=args.threads) for p in paths
    ]
    for llm in models:  # warm-up: page the weights in, build the graphs
        decode_seconds_per_token(llm, 8)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(args.rounds):
        for i, llm in enumerate(models):
            times[i].append(decode_seconds_per_token(llm, args.tokens))
    dense = statistics.median(times[0])
    rows = []
    for path, samples in zip(paths, times, strict=True):
        median = statistics.median(samples)
        rows.append({"gguf": str(path), "ms_per_token": 1000 * median, "tokens_per_s": 1 / median,
                     "time_ratio_vs_dense": median / dense, "rounds_ms": [1000 * s for s in samples]})
        print(f"{path.name:40s} {1000 * median:7.2f} ms/token  {1 / median:7.1f} tokens/s  "
              f"time ratio vs dense {median / dense:.3f}")
    print(f"({args.rounds} alternating rounds × {args.tokens} tokens, {args.threads} threads; median per model)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
