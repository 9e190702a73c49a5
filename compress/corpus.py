"""Text corpora for calibration and evaluation: loading, token windows, fingerprints.

Sources (the ``source`` argument of every function here):

* ``"web:calibration"`` / ``"web:eval"``: the shipped World English Bible corpus (``compress/data/``, built
  by ``scripts/prepare_corpus.py``; provenance in ``compress/data/SOURCE.md``). One document = one chapter;
  the two parts never share a chapter.
* ``"prose:calibration"`` / ``"prose:eval"``: the shipped second-domain corpus, Jane Austen's novels (built by
  ``scripts/prepare_prose.py``; provenance in ``compress/data/SOURCE.md``). One document = one chapter;
  ``prose:eval`` is a whole novel (*Persuasion*) that no calibration/training text contains.
* a **mixture** (calibration/training only): ``"mix:calibration"`` (the shipped mixture, ``MIXTURES``) or
  ``"<source>*<weight>+<source>*<weight>..."``, e.g. ``"web:calibration*0.7+notes.txt*0.3"``: the windows are
  split over the parts in proportion to the weights (``mixture_parts`` / ``calibration_batches``).
* ``"hf:NAME[:config]:split"``: a dataset the ``datasets`` library can reach (Hub id or local folder; the
  ``text`` column, or the only string column), see ``compress.hf_data``.
* a path to a user file:

  - ``.txt``: **one document per line**; blank lines are skipped, surrounding whitespace is stripped.
  - ``.jsonl``: one JSON object per line with a string field ``"text"``; blank lines and empty texts are
    skipped.

Everything is deterministic (a seed fully determines the sampled windows) and nothing is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from quant.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = _PACKAGE_DIR / "data"
SHIPPED: dict[str, str] = {
    "web:calibration": "web_calibration.txt",
    "web:eval": "web_eval.txt",
    "prose:calibration": "prose_calibration.txt",
    "prose:eval": "prose_eval.txt",
}
_SHIPPED_PREFIXES = ("web:", "prose:")
# shipped calibration/training mixtures: name -> ((source, weight), ...); never contains an evaluation split
MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {
    "mix:calibration": (("web:calibration", 1.0), ("prose:calibration", 1.0)),
}
USER_EXTENSIONS = (".txt", ".jsonl")

_TOKENIZE_CHUNK = 16  # documents per tokenizer call
_CALIBRATION_OVERSAMPLE = 2  # tokenise ~2x the tokens the windows cover, so random windows rarely overlap


def task_dir() -> Path:
    """Directory of the offline lm-eval task YAMLs (``secateurs_web_ppl``, ``secateurs_web_mc``).

    Pass it to ``lm_eval --include_path`` or ``lm_eval.tasks.TaskManager(include_path=...)``; the YAMLs find
    their data next to themselves, wherever the package is installed and whatever the working directory.
    """
    return _PACKAGE_DIR / "tasks"


def load_documents(source: str) -> list[str]:
    """Load the documents of ``source`` (see the module docstring) as a list of non-empty strings.

    Raises ``InputError`` (naming the file, and line where relevant) for: an unknown ``web:`` name, a missing,
    unreadable or non-UTF-8 file, an unsupported extension, a ``.jsonl`` line that is not valid JSON / not an
    object / has no string ``"text"``, and a corpus without any document.
    """
    if not isinstance(source, str) or not source.strip():
        raise InputError(
            f"corpus source must be 'web:calibration', 'web:eval' or a file path, got {source!r}"
        )
    if mixture_parts(source) is not None:
        raise InputError(
            f"corpus source {source!r} is a mixture: it has no single document list (use it for calibration "
            "or training data, not for evaluation)"
        )
    if source.startswith("hf:"):
        from compress.hf_data import hf_documents

        return hf_documents(source)
    if source.startswith(_SHIPPED_PREFIXES):
        if source not in SHIPPED:
            raise InputError(f"unknown shipped corpus {source!r}: expected one of {', '.join(SHIPPED)}")
        path = DATA_DIR / SHIPPED[source]
        if not path.is_file():
            raise InputError(f"shipped corpus file {path} is missing (broken installation?)")
    else:
        path = Path(source).expanduser()
        if path.suffix.lower() not in USER_EXTENSIONS:
            raise InputError(
                f"corpus file {path}: unsupported extension {path.suffix or '(none)'!r}, expected "
                f"{' or '.join(USER_EXTENSIONS)} (or 'web:calibration' / 'web:eval')"
            )
        if not path.exists():
            raise InputError(f"corpus file {path} does not exist")
        if not path.is_file():
            raise InputError(f"corpus file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"corpus file {path} is not valid UTF-8 (byte {e.start})") from e
    except OSError as e:
        raise InputError(f"corpus file {path} cannot be read: {e.strerror or e}") from e

    docs = list(_parse_jsonl(text, path) if path.suffix.lower() == ".jsonl" else _parse_txt(text))
    if not docs:
        raise InputError(f"corpus file {path} contains no documents (expected at least one non-empty text)")
    return docs


def _parse_txt(text: str) -> Iterator[str]:
    for line in text.splitlines():
        if line.strip():
            yield line.strip()


def _parse_jsonl(text: str, path: Path) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"corpus file {path}, line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise InputError(f'corpus file {path}, line {lineno}: expected a JSON object with a "text" field')
        if "text" not in obj:
            raise InputError(f'corpus file {path}, line {lineno}: missing field "text"')
        if not isinstance(obj["text"], str):
            raise InputError(
                f'corpus file {path}, line {lineno}: field "text" must be a string, '
                f"got {type(obj['text']).__name__}"
            )
        if obj["text"].strip():
            yield obj["text"]


def mixture_parts(source: str) -> tuple[tuple[str, float], ...] | None:
    """The ``(source, weight)`` parts of a mixture source, or None when ``source`` is not a mixture.

    A mixture is a name in ``MIXTURES`` or ``"<source>*<weight>+<source>*<weight>..."`` where every part ends in
    ``*<number>``. Raises ``InputError`` for a non-positive weight or a nested mixture.
    """
    if not isinstance(source, str):
        return None
    if source in MIXTURES:
        return MIXTURES[source]
    if source.startswith("mix:"):
        raise InputError(f"unknown shipped mixture {source!r}: expected one of {', '.join(MIXTURES)}")
    matches = [re.fullmatch(r"(.+)\*\s*([0-9.eE+-]+)", part.strip()) for part in source.split("+")]
    if "*" not in source or not all(matches):
        return None
    parts = []
    for m in matches:
        assert m is not None
        name, raw = m.group(1).strip(), m.group(2)
        try:
            weight = float(raw)
        except ValueError:
            return None
        if not math.isfinite(weight) or weight <= 0:
            raise InputError(f"mixture {source!r}: weight of {name!r} must be a positive number, got {raw!r}")
        if mixture_parts(name) is not None:
            raise InputError(f"mixture {source!r}: part {name!r} is itself a mixture")
        parts.append((name, weight))
    return tuple(parts)


def corpus_fingerprint(source: str) -> str:
    """SHA-256 (hex) of the documents of ``source``, each UTF-8 encoded and followed by ``\\n``.

    For the shipped ``.txt`` files this equals the file's own SHA-256 (listed in ``compress/data/SOURCE.md``).
    Checkpoints record it as the calibration-data hash. For a mixture: SHA-256 of the lines
    ``"<weight!r> <part fingerprint>\\n"`` of its parts in order.
    """
    parts = mixture_parts(source)
    if parts is not None:
        mixed = hashlib.sha256()
        for name, weight in parts:
            mixed.update(f"{weight!r} {corpus_fingerprint(name)}\n".encode())
        return mixed.hexdigest()
    h = hashlib.sha256()
    for doc in load_documents(source):
        h.update(doc.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _separator_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids put between documents: the EOS token, or the tokens of ``"\\n\\n"`` if there is none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return [eos]
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def _token_stream(
    tokenizer: PreTrainedTokenizerBase, docs: Iterable[str], max_tokens: int | None
) -> list[int]:
    """Token ids of ``docs`` (no special tokens) joined by the separator, stopping once ``max_tokens`` ids (if
    given) are collected; only as many documents as needed are tokenised."""
    sep = _separator_ids(tokenizer)
    ids: list[int] = []
    chunk: list[str] = []

    def flush() -> None:
        enc = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in enc:
            if ids:
                ids.extend(sep)
            ids.extend(doc_ids)
        chunk.clear()

    for doc in docs:
        chunk.append(doc)
        if len(chunk) == _TOKENIZE_CHUNK:
            flush()
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids
    if chunk:
        flush()
    return ids


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase, source: str, n_samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """Sample ``n_samples`` random token windows of length ``seq_len`` from ``source``.

    Documents are visited in a seeded random order (``torch.randperm``) and tokenised (without special
    tokens) until about ``2 * n_samples * seq_len`` tokens are collected (or the corpus ends), joined by the
    tokenizer's EOS token (``"\\n\\n"`` if it has none). Window starts are drawn uniformly from that stream
    with a ``torch.Generator`` seeded with ``seed``, so the result depends only on (corpus, tokenizer,
    arguments).

    Returns:
        ``torch.LongTensor`` of shape ``[n_samples, seq_len]``.

    Raises:
        InputError: bad ``n_samples`` / ``seq_len`` / ``seed``, a bad source (see ``load_documents``), or a
        corpus with fewer than ``seq_len + 1`` tokens.
    """
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    parts = mixture_parts(source)
    if parts is not None:
        return _mixture_batches(tokenizer, parts, n_samples, seq_len, seed)
    docs = load_documents(source)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=gen).tolist()
    target = _CALIBRATION_OVERSAMPLE * n_samples * seq_len + 1
    ids = _token_stream(tokenizer, (docs[i] for i in order), max_tokens=target)
    if len(ids) < seq_len + 1:
        raise InputError(
            f"calibration corpus {source!r} has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    stream = torch.tensor(ids, dtype=torch.long)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=gen)
    offsets = torch.arange(seq_len, dtype=torch.long)
    return cast(torch.LongTensor, stream[starts[:, None] + offsets[None, :]])  # [n_samples, seq_len]


def mixture_counts(weights: Sequence[float], n_samples: int) -> list[int]:
    """Split ``n_samples`` over parts in proportion to ``weights`` (largest remainder, ties to the earlier part)."""
    total = sum(weights)
    exact = [n_samples * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n_samples - sum(counts)]:
        counts[i] += 1
    return counts


def _mixture_batches(
    tokenizer: PreTrainedTokenizerBase,
    parts: tuple[tuple[str, float], ...],
    n_samples: int,
    seq_len: int,
    seed: int,
) -> torch.LongTensor:
    """Windows of each part (part i sampled with seed ``seed + i``), interleaved by a permutation seeded with
    ``seed``."""
    counts = mixture_counts([w for _, w in parts], n_samples)
    chunks: list[torch.Tensor] = [
        calibration_batches(tokenizer, name, count, seq_len, seed + i)
        for i, ((name, _), count) in enumerate(zip(parts, counts, strict=True))
        if count > 0
    ]
    stacked = torch.cat(chunks)
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return cast(torch.LongTensor, stacked[order])


def eval_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, max_windows: int | None = None
) -> torch.LongTensor:
    """Consecutive non-overlapping windows over the documents of ``source`` in file order.

    The documents are tokenised (without special tokens) and joined by the EOS token (``"\\n\\n"`` if none);
    window ``i`` is tokens ``[i * seq_len, (i + 1) * seq_len)``; the incomplete tail is dropped. With
    ``max_windows`` only the first ``max_windows`` windows are built (and only the documents they need are
    tokenised).

    Returns:
        ``torch.LongTensor`` of shape ``[n, seq_len]``, ``n = min(max_windows, n_tokens // seq_len)``.

    Raises:
        InputError: bad ``seq_len`` / ``max_windows``, a bad source, or fewer than ``seq_len`` tokens.
    """
    _check_positive("seq_len", seq_len)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    docs = load_documents(source)
    ids = _token_stream(tokenizer, docs, max_tokens=None if max_windows is None else max_windows * seq_len)
    n = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    if n == 0:
        raise InputError(
            f"evaluation corpus {source!r} has {len(ids)} tokens, fewer than seq_len = {seq_len}"
        )
    return cast(torch.LongTensor, torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len))
