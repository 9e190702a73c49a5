"""Acceptance check: a checkpoint loads in a *fresh* Python process with plain transformers
(``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``) and gives the same logits as the
in-memory compressed model, which this script rebuilds by re-running the recipe's steps (same seed).

    python scripts/check_reload.py RECIPE CHECKPOINT_DIR

Prints the class and parameter count seen by the fresh process and the max |logit difference| on a fixed,
padded batch of two sentences.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, dump = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
ids = tok(["In the beginning God created the heavens and the earth.", "Jesus wept."], return_tensors="pt",
          padding=True)
with torch.no_grad():
    logits = model(**ids).logits
torch.save({"ids": dict(ids), "logits": logits}, dump)
print("fresh process:", type(model).__name__, "parameters", sum(p.numel() for p in model.parameters()))
"""


def main() -> None:
    recipe, checkpoint = sys.argv[1], sys.argv[2]
    dump = Path(tempfile.mkdtemp()) / "fresh.pt"
    # a separate interpreter started outside the repository: nothing of ours is imported unless the checkpoint's
    # own modeling file asks for it
    subprocess.run([sys.executable, "-c", FRESH, str(Path(checkpoint).resolve()), str(dump)], check=True, cwd="/")
    from compress.adapters import arch_for
    from compress.corpus import calibration_batches
    from compress.loading import load_model
    from compress.pipeline import as_recipe
    from compress.steps import StepContext, apply_step

    cfg = as_recipe(recipe)
    loaded = load_model(cfg.model)
    cal = cfg.calibration
    ids = calibration_batches(loaded.tokenizer, cal.data, cal.samples, cal.seq_len, cfg.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    ctx = StepContext(model, tokenizer, arch_for(model.config), ids, cal.batch_size, None, cfg.seed, cal.data)
    for step in cfg.steps:
        apply_step(step, ctx)
    saved = torch.load(dump, weights_only=True)
    with torch.no_grad():
        logits = loaded.model(**saved["ids"]).logits
    diff = float((logits - saved["logits"]).abs().max())
    print("max |logit difference| fresh-process load vs in-memory model:", diff)


if __name__ == "__main__":
    main()
