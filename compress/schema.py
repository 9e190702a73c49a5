"""The recipe schema's base: strict pydantic models, field validators shared by every config, and the one
formatter that turns a pydantic error into a one-line message naming the field."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError

from compress.errors import one_line, shown

MAX_COUNT = 2**20  # upper bound of sample/window/batch/length counts: larger ones only exhaust memory
MAX_SEED = 2**32 - 1  # numpy's seed range (lm-eval seeds numpy with it)


class Strict(BaseModel):
    # strict: YAML gives typed scalars, so no coercion (a bool is not an int, "4" is not a number, 4.0 not a count)
    model_config = ConfigDict(extra="forbid", strict=True)


def compiled_regex(value: str) -> str:
    """``value`` itself when it compiles as a Python regular expression; ValueError naming the problem otherwise."""
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"not a valid regular expression: {err.msg} at position {err.pos}") from None
    return value


def task_names(values: list[str]) -> list[str]:
    """lm-eval task names, never paths: a task folder runs code (``compress.lm_tasks``)."""
    from compress.lm_tasks import task_name

    for value in values:
        try:
            task_name(value)
        except ValueError as err:
            raise ValueError(f"{shown(value)}: {err}") from None
    return values


def available_device(value: str) -> str:
    """``value`` when torch can run on it here ("cpu", "cuda", "cuda:N", "mps"); ValueError otherwise."""
    if value == "cpu":
        return value  # no torch import for the common case: validation stays fast
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError("not a torch device; expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"not available here ({count} CUDA device(s) visible)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available here")
    elif device.type != "cpu":
        raise ValueError("unsupported device type; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return value


def format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    loc = [p for i, p in enumerate(loc) if i == 0 or p != loc[i - 1]]  # drop the union tag ("prune.prune")
    where = one_line(".".join(loc), 120) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{where}'"
    given = first.get("input")
    quoted = "" if isinstance(given, dict | list) else f" (got {shown(given)})"
    return f"{origin}: field '{where}': {one_line(first['msg']).removeprefix('Value error, ')}{quoted}"
