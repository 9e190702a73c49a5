"""Regenerate docs/results/quantization.md: held-out perplexity of weight-only quantization with datatype sets ×
methods (round to nearest, AWQ, GPTQ, AWQ+GPTQ) at group 128, with the real stored bits/weight and the wall time of
quantization, on SmolLM2-135M (whose weights went through Q4_1) and on a small reference model trained from
scratch in fp32 (scripts/train_reference_lm.py); bitsandbytes NF4 as the external anchor.

    python scripts/quant_results.py [--only default|reference] [--dtypes bitmod4,...] [--methods rtn,gptq,...]
                                    [--prose] [--resume] [--reference DIR] [--out docs/results]

``--resume`` keeps the rows already in ``quantization.json`` (same model, same config) and runs only the missing
ones; the file is rewritten after every row, so a long run can be stopped and resumed. ``--prose`` also measures
every row on ``prose:eval`` (a second domain). The decoder linears are quantized (lm_head/embeddings stay fp32,
tied in SmolLM2); perplexity is computed on the dequantized weights (bit-identical to what the packed op produces,
see tests/compress/test_quantize.py). Cost on a 2-core CPU (shared): RTN rows ~2 min, AWQ/GPTQ rows ~5-10 min each
on the default model; the reference model is ~20× cheaper.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from compress.adapters import arch_for
from compress.corpus import calibration_batches
from compress.evaluate import perplexity
from compress.loading import cache_dir, load_model
from compress.quantize import dequantize_model, quantize_model, weight_storage
from compress.recipe import CalibrationConfig, PerplexityConfig, QuantizeConfig
from quant.select import paper_bits_per_weight

DTYPES = {"bitmod4": "BitMoD-4", "bitmod3": "BitMoD-3", "int4_asym": "INT4-asym", "int3_asym": "INT3-asym",
          "nf4": "NF4 (ours)"}  # fmt: skip
METHODS = ("rtn", "awq", "gptq", "awq+gptq")
SCALE8 = [("bitmod4", "gptq"), ("bitmod4", "awq+gptq"), ("int4_asym", "gptq"), ("bitmod3", "awq+gptq")]
OLD_LABELS = {"bitmod4": "BitMoD-4", "bitmod3": "BitMoD-3", "int4_asym": "INT4-asym", "int3_asym": "INT3-asym",
              "nf4": "NF4 (ours)"}  # fmt: skip
CARRIED_NOTE = "previous table (commit 7185829, same protocol; RTN and the anchors are unchanged code paths)"
AWQ_GRID = 10  # the AWQ paper uses 20 α values; 10 halves the cost on a shared 2-core CPU


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["dtypes"], row["method"], row["scale_bits"]


def quantize_row(dense: Any, tokenizer: Any, ids: torch.Tensor, dtypes: str, method: str, scale_bits: int,
                 prose: bool, carried: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """One table row; ``carried``: a row of the previous table whose PPL is reused (only bits are measured)."""
    model = copy.deepcopy(dense)
    arch = arch_for(model.config)
    cfg = QuantizeConfig(dtypes=dtypes, group_size=128, method=method, scale_bits=scale_bits, awq_grid=AWQ_GRID)
    start = time.perf_counter()
    quantize_model(model, arch, cfg, ids)
    seconds = time.perf_counter() - start
    load = os.getloadavg()[0]
    storage = weight_storage(model)
    # evaluate with the dequantized weights: identical values to the packed op, without re-dequantizing per forward
    dequantize_model(model)
    row = {
        "config": f"{DTYPES[dtypes]} {method.upper()}" + (" 8-bit scales" if scale_bits == 8 else ""),
        "dtypes": dtypes,
        "method": method,
        "scale_bits": scale_bits,
        "bits_per_weight": round(storage["bits_per_weight"], 4),
        "file_bits_per_weight": round(storage["file_bits_per_weight"], 4),
        "paper_bits": paper_bits_per_weight(dtypes, 128),
        "quantize_seconds": round(seconds, 1),
        "load": round(load, 1),
    }
    if carried is not None:
        return {**row, "ppl": carried["ppl"], "ppl_from": CARRIED_NOTE}
    row["ppl"] = _ppl(model, tokenizer, "web:eval")
    if prose:
        row["ppl_prose"] = _ppl(model, tokenizer, "prose:eval")
    return row


def _ppl(model: Any, tokenizer: Any, data: str) -> float:
    return round(perplexity(model, tokenizer, PerplexityConfig(data=data))["perplexity"], 3)


def evaluate_model(source: str, label: str, args: argparse.Namespace, previous: dict[str, Any] | None,
                   save: Any) -> dict[str, Any]:  # fmt: skip
    loaded = load_model(source)
    dense, tokenizer = loaded.model, loaded.tokenizer
    cal = CalibrationConfig()
    ids = calibration_batches(tokenizer, cal.data, cal.samples, cal.seq_len, args.seed)
    result = previous or {"model": label, "source": source, "rows": []}
    done = {row_key(r): r for r in result["rows"] if "method" in r}
    old_rows = {r["config"]: r for r in carried_rows(args.carry_over, label)}
    if "fp32" not in {r["config"] for r in result["rows"]} and "fp32" in old_rows:
        result["protocol"] = previous_protocol(args.carry_over, label)
        result["rows"].insert(0, {**old_rows["fp32"], "ppl_from": CARRIED_NOTE})
    if "fp32" not in {r["config"] for r in result["rows"]}:
        base = perplexity(dense, tokenizer, PerplexityConfig())
        fp32 = {"config": "fp32", "bits_per_weight": 32.0, "paper_bits": 32.0, "ppl": round(base["perplexity"], 3)}
        if args.prose:
            fp32["ppl_prose"] = _ppl(dense, tokenizer, "prose:eval")
        result["protocol"] = base["protocol"]
        result["rows"].insert(0, fp32)
        save()
    wanted = [(d, m, 16) for d in args.dtypes for m in args.methods]
    wanted += [(d, m, 8) for d, m in SCALE8 if args.scale8 and d in args.dtypes and m in args.methods]
    for dtypes, method, bits in wanted:
        old = done.get((dtypes, method, bits))
        if old is not None and not (args.fill_prose and "ppl_prose" not in old):
            continue
        carried = old_rows.get(OLD_LABELS[dtypes]) if (method, bits) == ("rtn", 16) and old is None else None
        row = quantize_row(dense, tokenizer, ids, dtypes, method, bits, args.prose or args.fill_prose, carried)
        if old is not None:  # re-measured for the prose column: the web PPL must reproduce the stored one
            row["ppl_before"] = old["ppl"]
            result["rows"][result["rows"].index(old)] = row
        else:
            result["rows"].append(row)
        print(label, row, flush=True)
        save()
    fp32_row = next((r for r in result["rows"] if r["config"] == "fp32"), None)
    if args.fill_prose and args.methods == ["rtn"] and fp32_row is not None and "ppl_prose" not in fp32_row:
        fp32_row.pop("ppl_from", None)
        fp32_row.update(ppl=_ppl(dense, tokenizer, "web:eval"), ppl_prose=_ppl(dense, tokenizer, "prose:eval"))
        save()
    if args.storage and "storage" not in result:
        result["storage"] = storage_rows(dense)
        save()
    anchor = "NF4 (bitsandbytes, block 64)"
    if args.bnb and anchor not in {r["config"] for r in result["rows"]}:
        bnb = old_rows.get(anchor)
        bnb = {**bnb, "ppl_from": CARRIED_NOTE} if bnb else bnb_nf4_row(loaded.path, tokenizer, args.prose)
        result["rows"].append(bnb)
        save()
    return result


def storage_rows(dense: Any) -> list[dict[str, Any]]:
    """Stored bits/weight of every datatype set (RTN, group 128) with fp16 and 8-bit scales, from the bytes written
    (no perplexity: the codec is lossless, and 8-bit scales are already what the choice used)."""
    rows = []
    arch = arch_for(dense.config)
    for dtypes in DTYPES:
        for scale_bits in (16, 8):
            model = copy.deepcopy(dense)
            quantize_model(model, arch, QuantizeConfig(dtypes=dtypes, group_size=128, scale_bits=scale_bits), None)
            storage = weight_storage(model)
            rows.append({"dtypes": dtypes, "scale_bits": scale_bits,
                         "bits_per_weight": round(storage["bits_per_weight"], 4),
                         "file_bits_per_weight": round(storage["file_bits_per_weight"], 4)})  # fmt: skip
            del model
    return rows


def carried_rows(path: str | None, label: str) -> list[dict[str, Any]]:
    """Rows of model ``label`` in a previous results json (none without ``--carry-over``)."""
    if path is None:
        return []
    return next((r["rows"] for r in json.loads(Path(path).read_text()) if r["model"] == label), [])


def previous_protocol(path: str, label: str) -> dict[str, Any]:
    return next(r["protocol"] for r in json.loads(Path(path).read_text()) if r["model"] == label)


def bnb_nf4_row(path: Path | None, tokenizer: Any, prose: bool) -> dict[str, Any]:
    """bitsandbytes NF4 through transformers' BitsAndBytesConfig on CPU (blocksize 64, fp32 absmax): the anchor
    users reach for, not the same storage."""
    row: dict[str, Any] = {"config": "NF4 (bitsandbytes, block 64)", "bits_per_weight": 4.5, "paper_bits": 4.5}
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, dtype=torch.float32)
        row["ppl"] = round(perplexity(model, tokenizer, PerplexityConfig())["perplexity"], 3)
        if prose:
            row["ppl_prose"] = _ppl(model, tokenizer, "prose:eval")
    except Exception as err:  # report, do not hide: the table says why the cross-check is missing
        row["ppl"] = None
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def _seconds(row: dict[str, Any]) -> str:
    seconds = _cell(row.get("quantize_seconds"))
    return seconds + (f" (load {row['load']})" if "load" in row else "")


def _cell(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Weight-only quantization: datatypes × error compensation (training-free)",
        "",
        "Regenerate with `python scripts/quant_results.py --prose --storage --resume` (writes this file and",
        "`quantization.json`; `--fill-prose` re-measures rows that lack the prose column).",
        "",
        "All decoder linears quantized at group 128 (lm_head / embeddings kept fp32). Methods: RTN = round to",
        "nearest with the per-group datatype choice; AWQ = per-input-channel scale search (10 α values, 2048",
        "calibration tokens) folded into the preceding norm / up_proj (v→o is skipped: grouped-query attention),",
        "plus clip search; GPTQ = error compensation with H = 2XXᵀ/N from 128 × 128 calibration tokens",
        "(dampening 0.01, natural order), each group's datatype chosen on the error-updated weights; layers are",
        "calibrated on the already-quantized earlier layers. `bits/weight` = bytes of every tensor the checkpoint",
        "stores for the packed linears (format version 2: bit planes, 2-bit type ids, fp16 or 8-bit scales,",
        "b-bit zero points) per weight; `file` = a real safetensors file of exactly those tensors (header",
        "included); `paper` = b + 8/128 as in BitMoD's accounting. `s` = wall seconds to quantize (a shared",
        "2-core CPU: other jobs ran at the same time, so times are indicative only; `load` = the 1-minute load",
        "average when the row's quantization finished).",
        "",
    ]
    for result in results:
        p = result.get("protocol", {})
        prose = any("ppl_prose" in r for r in result["rows"])
        lines += [
            f"## {result['model']}",
            "",
            f"Held-out perplexity on `{p.get('data')}`: {p.get('windows')} windows × {p.get('seq_len')} tokens "
            f"({p.get('target_tokens')} predicted tokens), {p.get('dtype')}"
            + ("; `prose` = the same protocol on `prose:eval` (Austen's *Persuasion*)." if prose else "."),
            "",
            *([*result["notes"], ""] if result.get("notes") else []),
            "| config | bits/weight | file | paper | s | web:eval PPL |" + (" prose:eval PPL |" if prose else ""),
            "|---|---|---|---|---|---|" + ("---|" if prose else ""),
        ]
        for row in result["rows"]:
            ppl = _cell(row.get("ppl")) if row.get("ppl") is not None else f"n/a ({row.get('error', '')})"
            ppl += " †" if "ppl_from" in row else ""
            cells = [row["config"], _cell(row["bits_per_weight"]), _cell(row.get("file_bits_per_weight")),
                     _cell(row["paper_bits"]), _seconds(row), ppl]  # fmt: skip
            if prose:
                cells.append(_cell(row.get("ppl_prose")))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if result.get("storage"):
            lines += [
                "Stored bits/weight of the format (RTN, group 128; the error-compensating methods store the same",
                "tensors), fp16 vs 8-bit double-quantized scales:",
                "",
                "| set | fp16 scales | 8-bit scales | file, 8-bit scales |",
                "|---|---|---|---|",
            ]
            by = {(r["dtypes"], r["scale_bits"]): r for r in result["storage"]}
            for dtypes, name in DTYPES.items():
                a, b = by[(dtypes, 16)], by[(dtypes, 8)]
                lines.append(
                    f"| {name} | {a['bits_per_weight']} | {b['bits_per_weight']} | {b['file_bits_per_weight']} |"
                )
            lines.append("")
    if any("ppl_from" in r for result in results for r in result["rows"]):
        lines += [f"† PPL from the {CARRIED_NOTE}; bits/weight measured in this run.", ""]
    return "\n".join(lines)


def _keep_freed_memory() -> None:
    """glibc returns freed blocks of ≥ 128 KiB to the OS and page-faults them in again on the next allocation: on
    this workload (many full-matrix temporaries) that doubles the cost of the elementwise ops. Keep them (≤ 32 MiB
    blocks from the heap, trim only above 1 GiB of free heap); the results are unchanged."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", default=str(cache_dir() / "models" / "reference-lm"))
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["default", "reference"], help="evaluate one model only")
    parser.add_argument("--dtypes", default=",".join(DTYPES), type=lambda s: s.split(","))
    parser.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","))
    parser.add_argument("--prose", action="store_true", help="also measure prose:eval")
    parser.add_argument("--no-bnb", dest="bnb", action="store_false", help="skip the bitsandbytes anchor")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of the existing json")
    parser.add_argument("--scale8", action="store_true", help="also the 8-bit (double-quantized) scale rows")
    parser.add_argument("--storage", action="store_true", help="bits/weight of every set with fp16 / 8-bit scales")
    parser.add_argument("--carry-over", help="previous results json: reuse its fp32, bitsandbytes and RTN PPLs")
    fill = "re-measure selected rows lacking a prose:eval PPL (and web; fp32 too with --methods rtn)"
    parser.add_argument("--fill-prose", action="store_true", help=fill)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two fighting ones
    _keep_freed_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quantization.json"
    old = json.loads(path.read_text()) if args.resume and path.exists() else []
    results: list[dict[str, Any]] = [r for r in old if any("method" in row for row in r["rows"])]

    def save() -> None:
        path.write_text(json.dumps(results, indent=2) + "\n")
        (out / "quantization.md").write_text(markdown(results))

    models = [("default", "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF)")]
    if Path(args.reference).exists():
        models.append((args.reference, "Reference LM (6.3 M, trained in fp32 here)"))
    for source, label in models:
        if args.only is not None and (args.only == "default") != (source == "default"):
            continue
        previous = next((r for r in results if r["model"] == label), None)
        if previous is None:
            previous = {"model": label, "source": source, "rows": []}
            results.append(previous)
        evaluate_model(source, label, args, previous, save)
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
