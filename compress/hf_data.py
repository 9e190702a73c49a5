"""``hf:NAME[:config]:split`` corpus sources: documents from the ``datasets`` library (Hub or local folders).

``NAME`` is a Hub dataset id (``wikitext``, ``allenai/c4``) or a local folder of data files; ``split`` may carry a
slice (``train[:1000]``). The text column is ``text`` when there is one, else the only string column. Without
network the Hub is unreachable: the error says so (local folders and the ``datasets`` cache still work).
"""

from __future__ import annotations

from typing import Any

from quant.errors import InputError

PREFIX = "hf:"


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``"hf:NAME[:config]:split"`` → (name, config or None, split)."""
    body, slice_ = source.removeprefix(PREFIX), ""
    if body.endswith("]") and "[" in body:  # a split slice ("train[:100]") may itself contain ':'
        body, slice_ = body[: body.rindex("[")], body[body.rindex("[") :]
    parts = body.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"corpus source {source!r}: expected hf:NAME:split or hf:NAME:config:split")
    parts[-1] += slice_
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def text_column(columns: dict[str, Any], source: str) -> str:
    """``text`` if present, else the single string column (``columns``: name → datasets feature)."""
    if "text" in columns:
        return "text"
    strings = [n for n, feature in columns.items() if getattr(feature, "dtype", None) in ("string", "large_string")]
    if len(strings) != 1:
        raise InputError(
            f"corpus source {source!r}: no 'text' column and {len(strings)} string columns ({', '.join(strings)}); "
            "expected exactly one"
        )
    return strings[0]


def hf_documents(source: str) -> list[str]:
    """The non-empty texts of an ``hf:`` source, in dataset order."""
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError:
        raise InputError(f"corpus source {source!r} needs the 'datasets' package: pip install datasets") from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types for offline / missing / bad-split cases
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"corpus source {source!r}: the datasets library could not load it (offline, or no such dataset, "
            f"config or split?): {first[:300]}"
        ) from None
    column = text_column(dict(data.features), source)
    docs = [text for text in data[column] if isinstance(text, str) and text.strip()]
    if not docs:
        raise InputError(f"corpus source {source!r}: column {column!r} has no non-empty text")
    return docs
