"""Reading recipe files and ``--set`` overrides: UTF-8 YAML, one mapping, no duplicate keys, bounded in size,
depth and alias expansion (``yaml.SafeLoader`` only). Every problem is one InputError line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from compress.errors import one_line, shown
from quant.errors import InputError

MAX_DEPTH = 32  # nesting levels a recipe file may have (the deepest valid recipe has under 10)
MAX_VALUES = 100_000  # values a recipe may expand to through YAML aliases
MAX_FILE_BYTES = 1 << 20


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """Read a recipe file: UTF-8 YAML holding one mapping, no duplicate keys, bounded in size and depth."""
    path = Path(path)
    where = f"recipe file {shown(str(path))}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise InputError(f"{where} cannot be read: {err.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"{where} is larger than {MAX_FILE_BYTES:,} bytes: not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    data = load_yaml(text, where)
    if data is None:
        raise InputError(f"{where} is empty: a recipe needs at least `model:` (e.g. `model: default`)")
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping (key: value lines) at the top level, got {type(data).__name__}")
    check_shape(data, where)
    return data


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated key is an error (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)} (first given on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML with :class:`RecipeLoader`; any problem is one InputError line with its line number."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{where} is not valid YAML: {one_line(err.problem or err.context)}{at}") from None
    except yaml.reader.ReaderError as err:
        raise InputError(
            f"{where} is not valid YAML: character #x{err.character:04x} at offset {err.position}"
        ) from None
    except yaml.YAMLError as err:
        raise InputError(f"{where} is not valid YAML: {one_line(err)}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit limit
        raise InputError(f"{where} holds a value that cannot be read: {one_line(err, 80)}") from None


def check_shape(data: Any, where: str) -> None:
    """Reject recipes nested deeper than MAX_DEPTH, expanding (through aliases) past MAX_VALUES, or recursive.

    Shared sub-trees (YAML aliases) are measured once, so this takes time linear in the file, not in its expansion.
    """
    measured: dict[int, tuple[int, int]] = {}  # id → (values, height); (-1, -1) while being measured

    def measure(node: Any, depth: int) -> tuple[int, int]:
        if not isinstance(node, dict | list):
            return 1, 0
        if depth > MAX_DEPTH:
            raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
        known = measured.get(id(node))
        if known == (-1, -1):
            raise InputError(f"{where} contains a recursive alias (a value that contains itself)")
        if known is None:
            measured[id(node)] = (-1, -1)
            values, height = 1, 0
            for child in node.values() if isinstance(node, dict) else node:
                n, h = measure(child, depth + 1)
                values, height = values + n, max(height, h + 1)
                if values > MAX_VALUES:
                    raise InputError(f"{where} expands to more than {MAX_VALUES:,} values (through YAML aliases?)")
            known = measured[id(node)] = (values, height)
        if depth + known[1] > MAX_DEPTH:
            raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
        return known

    measure(data, 0)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.path=value`` overrides (value parsed as YAML). List items by index: ``steps.0.prune.ratio=0.3``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {shown(item)}: expected key.path=value")
        value = load_yaml(raw, f"--set {shown(item)}: value")
        check_shape(value, f"--set {shown(item)}: value")
        node: Any = data
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (ValueError, IndexError, AttributeError, TypeError):
            raise InputError(f"--set {shown(item)}: no such place in the recipe ({shown(key)})") from None
    return data
