"""Bounded error text: every message that quotes a user value goes through :func:`shown`.

A user value can be arbitrarily large (a YAML alias bomb expands to billions of list items while occupying a few
kilobytes; a path can be megabytes long), so quoting it with ``repr`` could print gigabytes. :func:`shown` walks
at most a few levels and items (``reprlib``: time and output bounded by the limits, not by the value) and cuts
the text to ``limit`` characters. :func:`one_line` does the same for exception texts from libraries.
"""

from __future__ import annotations

import reprlib
from typing import Any

LIMIT = 80

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxstring = _REPR.maxother = LIMIT


def shown(value: Any, limit: int = LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (``…`` marks a cut), computed in bounded time."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: object, limit: int = 200) -> str:
    """The first line of ``text`` (e.g. a library's exception message), cut to ``limit`` characters."""
    line = str(text)[: limit * 4].strip().split("\n", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"
