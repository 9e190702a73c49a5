"""Train a small Llama-architecture reference LM (grouped-query attention) from scratch on the shipped corpus.

    python scripts/train_reference_lm.py [--out DIR] [--steps 500] [--minutes 25] [--threads 1] [--seed 0]
                                         [--log-every 10] [--overwrite] [--smoke]

What it is for: a model whose weights never went through a 4-bit grid (the default model, SmolLM2, came
from a Q4_1 GGUF), so that quantization datatypes can be compared honestly on it.

What it does, all on CPU in fp32 and deterministically:

1. trains a byte-level BPE tokenizer (vocabulary 4096) on ``web:calibration`` and wraps it in
   ``PreTrainedTokenizerFast`` with ``<unk>``/``<s>``/``</s>``/``<pad>``;
2. tokenises ``web:calibration`` into one stream (documents joined by ``</s>``, 1.08 M tokens) and cuts it into
   windows of 256 tokens; every epoch uses a seeded random offset and a seeded window order;
3. trains ``LlamaForCausalLM`` (hidden 256, 8 layers, 8 query heads / 2 KV heads of dim 32, MLP 640, tied
   embeddings: 6.30 M parameters) for a fixed number of steps (batch 16 x 256 tokens) with AdamW and a cosine
   schedule with linear warmup; ``web:eval`` is never trained on;
4. measures held-out perplexity with the project protocol (``eval_windows(tok, "web:eval", 256, 64)``, see
   ``compress.evaluate.perplexity``) and writes, atomically (temporary folder, then rename), the model
   (safetensors), the tokenizer and ``training.json`` to ``--out`` (default
   ``~/.cache/secateurs/models/reference-lm``).

Determinism: the result is fixed by (corpus, ``--seed``, ``--steps``, torch version, CPU kind);
``model.safetensors`` is byte-identical between runs (its SHA-256 is in ``training.json``). The thread count
did not change the weights in our checks (1 vs 2 threads), but that is not guaranteed: keep ``--threads``
when reproducing. ``--minutes`` is only a safety stop: if the wall clock runs out first the model is saved
but flagged ``"completed": false`` in ``training.json`` and the exit status is 3, because it is then *not*
the reproducible reference.

Cost: 2.7 s per step with 1 thread on an AMD EPYC core (about 1500 tokens/s, measured while another job held
the second core), so the default 500 steps (2.05 M tokens, about 1.9 epochs) take about 23 minutes, plus
about 15 s for the tokenizer, the evaluation and saving. ``--threads 2`` is faster only when both cores are
idle; if another process is busy on the machine it is about 5 times *slower* (threads wait for each other)
and the safety stop ends the run, hence the default of 1. ``--smoke`` (a 2-layer toy, 20 steps) takes a few
seconds; the tests use it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.corpus import corpus_fingerprint, load_documents  # noqa: E402
from compress.evaluate import perplexity  # noqa: E402
from compress.recipe import PerplexityConfig  # noqa: E402

TRAIN_SOURCE = "web:calibration"
EVAL_CONFIG = PerplexityConfig(data="web:eval", seq_len=256, max_windows=64)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
DEFAULT_OUT = "~/.cache/secateurs/models/reference-lm"
FINAL_LOSS_WINDOW = 10  # training.json also records the mean loss of the last 10 steps
EXIT_WALL_CLOCK = 3  # the --minutes safety stop was hit: output saved but flagged incomplete


@dataclass(frozen=True)
class Spec:
    """Everything that determines the trained model (besides seed, steps and thread count)."""

    vocab_size: int = 4096
    train_docs: int | None = None  # train the tokenizer (and the model) on the first N documents; None: all
    hidden_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 640  # ~8/3 x hidden, a multiple of 128 so quantization groups of 32/64/128 fit
    max_position_embeddings: int = 512  # RoPE; trained on seq_len tokens of context
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    steps: int = 500


DEFAULT = Spec()
SMOKE = Spec(
    vocab_size=512,
    train_docs=100,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    batch_size=4,
    lr=3e-3,
    steps=20,
)


@dataclass
class TrainResult:
    steps_done: int
    tokens_seen: int
    last_losses: list[float]
    seconds: float
    completed: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (written atomically)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT.steps})")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock safety stop for the training loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 only on an idle 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="print progress every N steps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--smoke", action="store_true", help=f"toy model, {SMOKE.steps} steps, for tests")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1 or args.log_every < 1 or args.minutes <= 0:
        parser.error("--threads and --log-every must be >= 1, --minutes > 0")
    return args


def train_tokenizer(docs: list[str], spec: Spec) -> PreTrainedTokenizerFast:
    """Byte-level BPE (deterministic: the trainer breaks count ties by pair) wrapped with the special tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=spec.max_position_embeddings,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents tokenised (no special tokens) and joined by EOS, like ``compress.corpus.eval_windows``."""
    ids: list[int] = []
    for doc_ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        if ids:
            ids.append(tokenizer.eos_token_id)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len]`` batches: per epoch a seeded offset into the stream and window order."""
    gen = torch.Generator().manual_seed(seed)
    n = (len(stream) - seq_len) // seq_len  # same count every epoch, whatever the offset
    if n < batch_size:
        raise SystemExit(f"corpus too small: {n} windows of {seq_len} tokens < batch size {batch_size}")
    while True:
        offset = int(torch.randint(0, seq_len, (1,), generator=gen))
        windows = stream[offset : offset + n * seq_len].view(n, seq_len)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield windows[order[i : i + batch_size]]


def build_model(spec: Spec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def lr_factor(step: int, warmup: int, steps: int, floor: float) -> float:
    """Linear warmup over ``warmup`` steps (first step already > 0), then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: torch.nn.Module, spec: Spec, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only, not on norms) with the warmup + cosine schedule of ``lr_factor``."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)
    warmup = max(1, round(spec.warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, steps, spec.min_lr_ratio)
    )
    return optimizer, schedule


def train(
    model: LlamaForCausalLM, data: Iterator[torch.Tensor], spec: Spec, steps: int, minutes: float, log_every: int
) -> TrainResult:
    """Fixed-step training loop; stops early (loudly) only if the ``minutes`` safety budget runs out."""
    optimizer, scheduler = make_optimizer(model, spec, steps)
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    done = 0
    for step in range(1, steps + 1):
        if time.perf_counter() - start > minutes * 60:
            _warn_wall_clock(done, steps, minutes)
            break
        losses.append(_train_step(model, next(data), optimizer, scheduler, spec.grad_clip))
        done = step
        if step % log_every == 0 or step == steps:
            _log_progress(step, steps, losses[-log_every:], scheduler, spec, time.perf_counter() - start)
    model.eval()
    return TrainResult(
        steps_done=done,
        tokens_seen=done * spec.batch_size * spec.seq_len,
        last_losses=losses[-FINAL_LOSS_WINDOW:],
        seconds=time.perf_counter() - start,
        completed=done == steps,
    )


def _train_step(
    model: LlamaForCausalLM,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    grad_clip: float,
) -> float:
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


def _log_progress(
    step: int, steps: int, recent: list[float], scheduler: torch.optim.lr_scheduler.LambdaLR, spec: Spec, secs: float
) -> None:
    tokens_per_s = step * spec.batch_size * spec.seq_len / secs
    eta = secs / step * (steps - step)
    print(
        f"step {step:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
        f"{tokens_per_s:,.0f} tok/s  {secs / step:.2f} s/step  elapsed {secs / 60:.1f} min  eta {eta / 60:.1f} min",
        flush=True,
    )


def _warn_wall_clock(done: int, steps: int, minutes: float) -> None:
    bar = "!" * 100
    print(
        f"{bar}\nWARNING: the --minutes {minutes:g} safety stop was hit after {done}/{steps} steps.\n"
        f"The saved model is NOT the deterministic reference (training.json says completed: false);\n"
        f"rerun on a less loaded machine or with a larger --minutes.\n{bar}",
        file=sys.stderr,
        flush=True,
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def training_record(
    args: argparse.Namespace,
    spec: Spec,
    steps: int,
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    result: TrainResult,
    ppl: dict,
    wall: float,
) -> dict:
    """The content of ``training.json`` (everything except ``model_sha256``, added after saving)."""
    return {
        "purpose": "from-scratch reference LM whose weights never went through a 4-bit grid",
        "smoke": args.smoke,
        "completed": result.completed,
        "spec": asdict(spec),
        "model_config": model.config.to_diff_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_requested": steps,
        "steps": result.steps_done,
        "tokens_seen": result.tokens_seen,
        "train_data": {
            "source": TRAIN_SOURCE,
            "fingerprint": corpus_fingerprint(TRAIN_SOURCE),
            "documents": spec.train_docs or "all",
            "tokens": len(stream),
        },
        "epochs": round(result.tokens_seen / max(1, len(stream)), 3),
        "final_train_loss": result.last_losses[-1] if result.last_losses else None,
        "final_train_loss_mean_last_10": sum(result.last_losses) / max(1, len(result.last_losses)),
        "eval": ppl,
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(wall, 1),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "minutes_budget": args.minutes,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0],
        },
    }


def write_atomically(
    out: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, record: dict, overwrite: bool
) -> None:
    """Write everything into a hidden sibling folder, then rename it to ``out`` (replacing it if ``overwrite``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        record["model_sha256"] = sha256_file(tmp / "model.safetensors")
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise SystemExit(f"{out} appeared while training; not replaced (use --overwrite)")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def setup_determinism(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = SMOKE if args.smoke else DEFAULT
    steps = args.steps or spec.steps
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    setup_determinism(args.threads)
    wall_start = time.perf_counter()

    docs = load_documents(TRAIN_SOURCE)[: spec.train_docs]
    tokenizer = train_tokenizer(docs, spec)
    stream = token_stream(tokenizer, docs)
    model = build_model(spec, tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tokenizer: {len(tokenizer)} tokens; train stream: {len(stream):,} tokens; model: {n_params:,} params; "
        f"{steps} steps x {spec.batch_size} x {spec.seq_len} tokens; {args.threads} threads",
        flush=True,
    )

    data = batches(stream, spec.seq_len, spec.batch_size, args.seed)
    result = train(model, data, spec, steps, args.minutes, args.log_every)
    ppl = perplexity(model, tokenizer, EVAL_CONFIG)
    print(f"held-out perplexity ({EVAL_CONFIG.data}): {ppl['perplexity']:.3f}", flush=True)
    record = training_record(args, spec, steps, model, stream, result, ppl, time.perf_counter() - wall_start)
    write_atomically(out, model, tokenizer, record, args.overwrite)
    print(f"wrote {out} in {time.perf_counter() - wall_start:.0f} s total", flush=True)
    return 0 if result.completed else EXIT_WALL_CLOCK


if __name__ == "__main__":
    sys.exit(main())
