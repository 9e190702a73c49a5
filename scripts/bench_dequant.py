"""Fused bit-plane dequant + GEMV (cuda_ext) against fp16 ``torch.matmul`` on the same shapes, same run.

    python scripts/bench_dequant.py --out runs/bench_dequant [--bits 4 3 2] [--batches 1 8] [--peak-gbs 3350]

Per (out × in, bits, batch): median time of the fused kernel and of ``x @ W.T`` with a dense fp16 W, the
speed-up, the effective bandwidth of the packed weight (planes + scales + type ids) and its share of the
GPU's peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s, from the device name; ``--peak-gbs`` overrides);
bitsandbytes NF4 (``bnb.matmul_4bit``) when ``import bitsandbytes`` works. Timing: CUDA graphs of ``--reps``
calls replayed with CUDA events (median of ``--iters`` replays after warm-up), rotating among enough weight
copies to exceed 4× L2. Writes ``bench_dequant.json`` and ``bench_dequant.md`` to ``--out``. End-to-end
decode tokens/s is not measured here (it needs a quantised model checkpoint). Without a CUDA device it
prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_ext import build  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672))  # (out, in) of W
PEAK_GBS = (("H200", 4800.0), ("H100 PCIE", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("A100", 2039.0))
GROUP_SIZE = 128


def peak_gbs(device_name: str) -> float | None:
    name = device_name.upper()
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def median_ms(fns: Sequence[Callable[[], object]], reps: int, iters: int) -> float:
    """Median ms per call of fns[i % len(fns)], timed as a CUDA graph of `reps` calls (else an eager loop)."""
    for fn in fns:  # warm-up outside the graph: module load, allocator, cudaFuncSetAttribute
        fn()
    torch.cuda.synchronize()

    def run_all() -> None:
        for i in range(reps):
            fns[i % len(fns)]()

    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_all()  # warm the side stream before capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                run_all()
        replay = graph.replay
    except Exception as exc:
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eager launches)")
        replay = run_all
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times[3:])


def random_packed(out_f: int, in_f: int, bits: int, device: torch.device) -> tuple:
    """Random bit planes (in % 32 == 0 here, so every bit pattern is a valid code), BitMoD-like groups."""
    n_words, n_groups = math.ceil(in_f / 32), math.ceil(in_f / GROUP_SIZE)
    planes = torch.randint(-(2**31), 2**31 - 1, (bits, out_f, n_words), dtype=torch.int32, device=device)
    type_ids = torch.randint(0, 4, (out_f, n_groups), dtype=torch.uint8, device=device)
    scales = (torch.rand(out_f, n_groups, device=device) * 0.01 + 1e-3).half()
    tables = torch.randn(4, 2**bits, device=device)
    return planes, type_ids, scales, None, tables


def packed_bytes(packed: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in packed[:4] if t is not None)


def copies_for(nbytes: int, l2_bytes: int, cap: int = 32) -> int:
    return max(1, min(cap, math.ceil(4 * l2_bytes / max(nbytes, 1))))


def bench_bnb(bnb, out_f: int, in_f: int, batch: int, l2: int, reps: int, iters: int) -> float | None:
    try:
        weights = []
        for _ in range(copies_for(out_f * in_f // 2, l2)):
            w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
            weights.append(bnb.functional.quantize_4bit(w, quant_type="nf4"))
            del w
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
        fns = [partial(bnb.matmul_4bit, x, q.t(), quant_state=s) for q, s in weights]
        return median_ms(fns, reps, iters)
    except Exception as exc:
        print(f"  bitsandbytes NF4 failed: {type(exc).__name__}: {exc}")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dequant"))
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth, GB/s")
    parser.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    parser.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    ext = build.load_extension()
    if ext is None:
        print(f"CUDA extension unavailable: {build.unavailable_reason()}")
        return 1
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a bitsandbytes build without this CUDA
        bnb = None
        print(f"bitsandbytes not available ({type(exc).__name__}: {exc}): NF4 column left empty")

    props = torch.cuda.get_device_properties(0)
    peak = args.peak_gbs or peak_gbs(props.name)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    print(
        f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
        f"peak {peak or 'unknown'} GB/s"
    )
    print("end-to-end decode tokens/s: not measured (needs a quantised checkpoint)")
    device = torch.device("cuda")
    rows = []
    for (out_f, in_f), batch in ((s, b) for s in SHAPES for b in args.batches):
        dense_copies = [
            torch.randn(out_f, in_f, device=device, dtype=torch.float16)
            for _ in range(copies_for(out_f * in_f * 2, l2))
        ]
        x = torch.randn(batch, in_f, device=device, dtype=torch.float16)
        fp16_ms = median_ms([partial(torch.matmul, x, w.t()) for w in dense_copies], args.reps, args.iters)
        del dense_copies
        bnb_ms = bench_bnb(bnb, out_f, in_f, batch, l2, args.reps, args.iters) if bnb else None
        for bits in args.bits:
            copies = [random_packed(out_f, in_f, bits, device)]
            nbytes = packed_bytes(copies[0])
            copies += [random_packed(out_f, in_f, bits, device) for _ in range(copies_for(nbytes, l2) - 1)]
            fused_ms = median_ms(
                [partial(ext.quant_matmul, x, *p, in_f, GROUP_SIZE) for p in copies],
                args.reps,
                args.iters,
            )
            # sanity: the fused GEMV against dequantise (fp32) + matmul on this shape
            w32 = ext.dequantize(*copies[0], in_f, GROUP_SIZE, torch.float32)
            want = x.float() @ w32.T
            got = ext.quant_matmul(x, *copies[0], in_f, GROUP_SIZE).float()
            rel_err = ((got - want).norm() / want.norm()).item()
            del copies, w32
            gbs = nbytes / fused_ms / 1e6
            rows.append(
                {
                    "out": out_f,
                    "in": in_f,
                    "bits": bits,
                    "batch": batch,
                    "fused_ms": fused_ms,
                    "fp16_ms": fp16_ms,
                    "speedup_vs_fp16": fp16_ms / fused_ms,
                    "packed_bytes": nbytes,
                    "effective_gbs": gbs,
                    "pct_of_peak": 100 * gbs / peak if peak else None,
                    "fp16_gbs": out_f * in_f * 2 / fp16_ms / 1e6,
                    "bnb_nf4_ms": bnb_ms,
                    "rel_err_vs_dequant": rel_err,
                }
            )
            print(_markdown_row(rows[-1]))
        torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": props.name,
        "peak_gbs": peak,
        "group_size": GROUP_SIZE,
        "reps": args.reps,
        "iters": args.iters,
        "bitsandbytes": bnb is not None,
        "torch": torch.__version__,
    }
    (args.out / "bench_dequant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = "\n".join([_HEADER, *(_markdown_row(r) for r in rows)])
    (args.out / "bench_dequant.md").write_text(f"# bench_dequant on {props.name}\n\n{table}\n")
    print(table)
    return 0


_HEADER = (
    "| out × in | bits | B | fused ms | fp16 ms | speed-up | packed GB/s | % peak | bnb NF4 ms | rel err |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _markdown_row(r: dict) -> str:
    pct = f"{r['pct_of_peak']:.0f}" if r["pct_of_peak"] is not None else "–"
    bnb_ms = f"{r['bnb_nf4_ms']:.4f}" if r["bnb_nf4_ms"] is not None else "–"
    return (
        f"| {r['out']}×{r['in']} | {r['bits']} | {r['batch']} | {r['fused_ms']:.4f} | {r['fp16_ms']:.4f} | "
        f"{r['speedup_vs_fp16']:.2f} | {r['effective_gbs']:.0f} | {pct} | {bnb_ms} | "
        f"{r['rel_err_vs_dequant']:.1e} |"
    )


if __name__ == "__main__":
    sys.exit(main())
