"""Scale demonstration: compress a randomly initialised Llama with the shapes of a 7B model, streamed.

    python scripts/scale_demo.py --dir /tmp/scale7b [--layers 32] [--samples 4] [--keep]

1. writes the model as bf16 safetensors shards (one per decoder layer, plus embeddings and head), generated tensor
   by tensor from a seeded generator (never the whole model in memory; ~13.5 GB for 32 layers);
2. runs ``secateurs run`` in a child process on a recipe that prunes 20 % (FLAP, AL-AM, dense statistics) and
   quantizes (INT4 RTN, groups of 128), with ``stream: true`` and no evaluation (the reload check is included);
3. prints the child's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) against the bf16 size and
   the goal 0.25 × bf16 size + calibration activations, and the per-layer times from the run's report;
4. deletes the generated model and the checkpoint unless ``--keep``.

Random weights: the numbers measure memory and time, not quality. Weights ~ N(0, 0.02²), norms 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny_tokenizer: an offline byte-level tokenizer (ids < 512 < vocab)

SHAPES = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def layer_tensors(config: LlamaConfig, index: int, seed: int) -> dict[str, torch.Tensor]:
    """Decoder layer ``index``'s tensors (bf16), from a generator seeded by (seed, index)."""
    g = torch.Generator().manual_seed(seed * 1000 + index + 1)
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    out = {}
    for name, shape in shapes.items():
        out[f"model.layers.{index}.{name}"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        out[f"model.layers.{index}.{name}"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def generate(folder: Path, layers: int, seed: int) -> int:
    """Write the model shard by shard; returns its size in bytes."""
    from tests.tiny_tokenizer import build_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES, num_hidden_layers=layers, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    build_tiny_tokenizer(folder)
    total = layers + 1
    weight_map: dict[str, str] = {}
    g = torch.Generator().manual_seed(seed)
    vocab, hidden = config.vocab_size, config.hidden_size
    outer = {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
    }
    shards = [outer] + [None] * layers
    for number in range(total):
        tensors = shards[number] if number == 0 else layer_tensors(config, number - 1, seed)
        assert tensors is not None
        name = f"model-{number + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        shards[number] = None
        del tensors
        print(f"  wrote {name}", flush=True)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return size


def recipe(model: Path, out: Path, samples: int, seq_len: int) -> dict:
    return {
        "model": str(model),
        "dtype": "float32",  # the math in fp32 (bf16 matmuls are several times slower on CPUs without AMX)
        "stream": True,
        "seed": 0,
        "calibration": {"data": "web:calibration", "samples": samples, "seq_len": seq_len, "batch_size": samples},
        "steps": [
            {"prune": {"method": "flap", "ratio": 0.2, "metric": "WIFV", "structure": "AL-AM", "statistics": "dense"}},
            {"quantize": {"dtypes": "int4_asym", "group_size": 128, "method": "rtn"}},
        ],
        "output": {"dir": str(out), "overwrite": True},
        "evaluation": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/scale7b"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated model and the checkpoint")
    parser.add_argument("--generate-only", action="store_true", help="write the model and stop")
    args = parser.parse_args()
    model, out = args.dir / "model", args.dir / "out"
    clock = time.perf_counter()
    if not (model / "model.safetensors.index.json").exists():
        print(f"generating a random 7B-shape Llama ({args.layers} layers, bf16) in {model}", flush=True)
        generate(model, args.layers, args.seed)
    bf16_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"model: {bf16_bytes / 1e9:.2f} GB bf16 on disk ({time.perf_counter() - clock:.0f} s)", flush=True)
    if args.generate_only:
        return
    recipe_path = args.dir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(model, out, args.samples, args.seq_len), sort_keys=False))
    clock = time.perf_counter()
    secateurs = Path(sys.executable).with_name("secateurs")
    code = subprocess.call([str(secateurs), "run", str(recipe_path)])
    seconds = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    hidden = SHAPES["hidden_size"]
    # layer inputs of the calibration stream + the probe stream, fp32, and one layer's outputs of each
    activations = 2 * (args.samples + 2) * args.seq_len * hidden * 4
    goal = 0.25 * bf16_bytes + activations
    print(f"exit code {code}; wall {seconds:.0f} s")
    verdict = "met" if peak <= goal else "missed"
    print(f"peak RSS {peak / 1e9:.3f} GB = {peak / bf16_bytes:.3f} x bf16 size ({bf16_bytes / 1e9:.2f} GB); "
          f"goal <= 0.25 x bf16 + activations = {goal / 1e9:.3f} GB: {verdict}")  # fmt: skip
    report_path = out / "report.json"
    if code == 0 and report_path.exists():
        report = json.loads(report_path.read_text())
        times = report["stream"]["layer_seconds"]
        pre = report["stream"].get("statistics_seconds", [])
        print(f"main pass per layer: mean {sum(times) / len(times):.1f} s, min {min(times):.1f}, max {max(times):.1f}")
        if pre:
            print(f"statistics pass per layer: mean {sum(pre) / len(pre):.1f} s")
        print(f"reload max |dlogit| {report['reload_max_abs_logit_diff']:.3e}; steps: {report['steps_summary']}")
        print(f"params {report['sizes']['params_before']:,} -> {report['sizes']['params_after']:,}; "
              f"checkpoint {sum(p.stat().st_size for p in out.glob('*.safetensors')) / 1e9:.2f} GB")  # fmt: skip
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
