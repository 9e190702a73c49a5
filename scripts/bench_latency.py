"""CPU latency of a pruned model vs the dense model, measured in the same run (ratios, not absolute targets).

    python scripts/bench_latency.py [--pruned out/smollm2-flap-20] [--threads 2]

Without --pruned, the default model is pruned with FLAP 20 % (64 × 128 calibration tokens) in-process.
Reports the median of several runs for (a) one 512-token forward pass and (b) 64-token greedy decoding from a
32-token prompt (KV cache on), and pruned/dense ratios (target ≤ 0.85).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from compress.adapters import arch_for
from compress.corpus import calibration_batches, eval_windows
from compress.loading import load_model
from compress.prune.pruner import count_parameters, prune_model
from compress.recipe import PruneConfig


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    forward = median_seconds(lambda: model(input_ids=ids[:, :512], use_cache=False), repeats)
    prompt = ids[:, :32]
    decode = median_seconds(
        lambda: model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
            pad_token_id=0,
        ),
        repeats,
    )
    return {"forward_512_s": forward, "decode_64_s": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pruned", help="a pruned checkpoint folder (default: prune in-process)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_model("default")
    ids = eval_windows(dense.tokenizer, "web:eval", 512, 1)
    if args.pruned:
        pruned = load_model(args.pruned).model
    else:
        pruned = copy.deepcopy(dense.model)
        cal = calibration_batches(dense.tokenizer, "web:calibration", 64, 128, 0)
        prune_model(pruned, arch_for(pruned.config), PruneConfig(method="flap", ratio=0.2), cal)
    rows = {"dense": measure(dense.model, ids, args.repeats), "pruned": measure(pruned, ids, args.repeats)}
    print(f"threads={args.threads} repeats={args.repeats} (median seconds)")
    print(f"params: dense {count_parameters(dense.model):,}  pruned {count_parameters(pruned):,}")
    for key in ("forward_512_s", "decode_64_s"):
        d, p = rows["dense"][key], rows["pruned"][key]
        print(f"{key:14s} dense {d:.4f}  pruned {p:.4f}  ratio {p / d:.3f}")


if __name__ == "__main__":
    main()
