"""Throughput of per-group datatype selection (million weights / s), with RTN INT4 fake-quant as baseline.

    python scripts/bench_quantize.py [--sets bitmod4,bitmod3,...] [--repeats 3] [--threads N]

Times :func:`quant.select.choose_group_datatypes` (selection + codes, no packing) on random gaussian matrices
of 2048×2048 and 576×1536, group size 128 (32 for mxfp4), and reports each set relative to a plain
round-to-nearest symmetric INT4 fake-quant written inline (the cheapest possible quantiser).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.datatypes import DATATYPE_SETS, get_datatype_set  # noqa: E402
from quant.select import choose_group_datatypes  # noqa: E402

SHAPES = ((2048, 2048), (576, 1536))
DEFAULT_SETS = "bitmod4,bitmod3,fp4,nf4,int4_sym,int4_asym,ant4,mxfp4"


def rtn_int4_fake_quant(W: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Baseline: symmetric INT4 round-to-nearest per group, s = absmax/7, Ŵ = s·clamp(round(W/s), −7, 7)."""
    wg = W.reshape(W.shape[0], -1, group_size)
    s = (wg.abs().amax(-1, keepdim=True) / 7).clamp(min=2.0**-24).half().float()
    return ((wg / s).round().clamp(-7, 7) * s).reshape(W.shape)


def mweights_per_s(fn: Callable[[], object], numel: int, repeats: int) -> float:
    """Best-of-``repeats`` throughput after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return numel / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=DEFAULT_SETS, help=f"comma-separated, from {sorted(DATATYPE_SETS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [get_datatype_set(n.strip()).name for n in args.sets.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, best of {args.repeats}")
    for out_features, in_features in SHAPES:
        W = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        base = mweights_per_s(partial(rtn_int4_fake_quant, W), W.numel(), args.repeats)
        print(f"\n{out_features}×{in_features}: RTN INT4 fake-quant baseline {base:8.1f} Mw/s")
        print(f"{'set':<10} {'types':>5} {'G':>4} {'Mw/s':>8} {'vs RTN':>7}")
        for name in names:
            G = get_datatype_set(name).group_size or 128
            rate = mweights_per_s(partial(choose_group_datatypes, W, name, G), W.numel(), args.repeats)
            n_types = len(get_datatype_set(name).members)
            print(f"{name:<10} {n_types:>5} {G:>4} {rate:8.1f} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
