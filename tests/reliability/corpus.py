"""A corpus of bad inputs for ``secateurs run``, by class: each must give exit code 2, one line on stderr naming
the field, path or tensor, and write nothing. ``{model}`` in a recipe is a tiny saved model folder, ``{tmp}`` the
case's own folder (the working directory while it runs).

Cases marked ``before_load`` must also fail before the model is loaded (validation before expensive work).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    kind: str  # the class of bad input
    name: str
    recipe: str | bytes  # the recipe file's text (or raw bytes)
    needle: str  # what the error line must contain (field, path or tensor)
    args: tuple[str, ...] = ()  # extra `secateurs run` arguments ({tmp} expanded)
    setup: Callable[[Path], None] | None = field(default=None, compare=False)  # prepares files in the case folder
    before_load: bool = True  # must fail before the model is loaded
    root_ok: bool = True  # meaningful when running as root (permission cases are not)


BASE = "model: {model}\nevaluation: null\n"
PRUNE = BASE + "steps:\n  - prune: {ratio: 0.2}\n"


def _bomb() -> str:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\nseed: [*h]\n"


def _write(rel: str, data: str | bytes = "") -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def _mkdir(rel: str, *files: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / rel).mkdir(parents=True)
        for name in files:
            (tmp / rel / name).write_text("keep me\n")

    return setup


def _model_folder(config: dict | str, weights: bool = True) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        folder = tmp / "m"
        folder.mkdir()
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights:
            (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")

    return setup


def _read_only(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)


YAML = [
    Case("yaml", "empty file", "", "is empty"),
    Case("yaml", "comments only", "# model: default\n", "is empty"),
    Case("yaml", "null document", "~\n", "is empty"),
    Case("yaml", "list at top level", "- model: default\n", "expected a mapping"),
    Case("yaml", "scalar at top level", "default\n", "expected a mapping"),
    Case("yaml", "unclosed bracket", "model: [default\n", "line 2"),
    Case("yaml", "tab indentation", "model:\tdefault\n\tseed: 1\n", "line 1"),
    Case("yaml", "NUL character", "model: de\x00fault\n", "#x0000"),
    Case("yaml", "latin-1 bytes", b"model: caf\xe9\n", "not UTF-8"),
    Case("yaml", "UTF-16 file", "model: default\n".encode("utf-16"), "not UTF-8"),
    Case("yaml", "duplicate top-level key", BASE + "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    Case(
        "yaml",
        "duplicate nested key",
        BASE + "steps:\n  - prune:\n      ratio: 0.2\n      ratio: 0.9\n",
        "duplicate key 'ratio' (first given on line 5) at line 6",
    ),
    Case("yaml", "alias bomb", _bomb(), "expands to more than"),
    Case("yaml", "recursive alias", BASE + "seed: &s [*s]\n", "recursive alias"),
    Case("yaml", "deep nesting", BASE + "seed: " + "[" * 60 + "]" * 60 + "\n", "nested too deeply"),
    Case("yaml", "integer past 4300 digits", BASE + "seed: " + "9" * 5000 + "\n", "cannot be read"),
    Case("yaml", "recipe is a folder", "", "cannot be read", args=("--recipe-is-dir",)),
    Case("yaml", "recipe file missing", "", "cannot be read", args=("--recipe-missing",)),
    Case("yaml", "recipe file of 2 MB", "# " + "x" * (2 << 20) + "\n", "larger than"),
]

SCHEMA = [
    Case("schema", "unknown top-level key", BASE + "stepz: []\n", "unknown key 'stepz'"),
    Case("schema", "unknown nested key", PRUNE + "calibration: {sample: 4}\n", "unknown key 'calibration.sample'"),
    Case("schema", "bool seed", BASE + "seed: true\n", "field 'seed'"),
    Case("schema", "negative seed", BASE + "seed: -1\n", "field 'seed'"),
    Case("schema", "seed past 2^32", BASE + "seed: 100000000000000000000\n", "field 'seed'"),
    Case("schema", "float seed", BASE + "seed: 1.5\n", "field 'seed'"),
    Case("schema", "string seed", BASE + "seed: '7'\n", "field 'seed'"),
    Case("schema", "bool samples", PRUNE + "calibration: {samples: true}\n", "field 'calibration.samples'"),
    Case("schema", "zero samples", PRUNE + "calibration: {samples: 0}\n", "field 'calibration.samples'"),
    Case("schema", "samples 10^12", PRUNE + "calibration: {samples: 1000000000000}\n", "field 'calibration.samples'"),
    Case("schema", "float seq_len", PRUNE + "calibration: {seq_len: 64.0}\n", "field 'calibration.seq_len'"),
    Case("schema", "ratio 1.5", BASE + "steps:\n  - prune: {ratio: 1.5}\n", "field 'steps.0.prune.ratio'"),
    Case("schema", "bool ratio", BASE + "steps:\n  - prune: {ratio: true}\n", "field 'steps.0.prune.ratio'"),
    Case("schema", "unknown method", BASE + "steps:\n  - prune: {method: sparsegpt}\n", "steps.0.prune.method"),
    Case("schema", "step with two kinds", BASE + "steps:\n  - {prune: {}, quantize: {}}\n", "steps.0"),
    Case("schema", "steps as a mapping", BASE + "steps: {prune: {}}\n", "field 'steps'"),
    Case("schema", "quantize before prune", BASE + "steps:\n  - quantize: {}\n  - prune: {}\n", "steps.1"),
    Case("schema", "unknown datatype set", BASE + "steps:\n  - quantize: {dtypes: int5}\n", "steps.0.quantize.dtypes"),
    Case("schema", "bool group_size", BASE + "steps:\n  - quantize: {group_size: true}\n", "group_size"),
    Case("schema", "invalid modules regex", BASE + "steps:\n  - quantize: {modules: 'mlp\\.(up'}\n", "modules"),
    Case(
        "schema",
        "invalid override regex",
        BASE + "steps:\n  - quantize: {overrides: [{match: '[a-', dtypes: int4_asym}]}\n",
        "steps.0.quantize.overrides.0.match",
    ),
    Case("schema", "free-form device", BASE + "device: gpu0\n", "field 'device'"),
    Case("schema", "absent CUDA device", BASE + "device: 'cuda:7'\n", "field 'device'"),
    Case("schema", "meta device", BASE + "device: meta\n", "field 'device'"),
    Case("schema", "unknown dtype", BASE + "dtype: int8\n", "field 'dtype'"),
    Case("schema", "model as a number", "model: 7\nevaluation: null\n", "field 'model'"),
    Case("schema", "push_to_hub as a number", BASE + "output: {push_to_hub: 5}\n", "field 'output.push_to_hub'"),
    Case("schema", "overwrite as a string", BASE + "output: {overwrite: 'yes'}\n", "field 'output.overwrite'"),
    Case("schema", "zero ppl windows", "model: {model}\nevaluation: {perplexity: {max_windows: 0}}\n", "max_windows"),
    Case("schema", "negative lm-eval limit", "model: {model}\nevaluation: {lm_eval: {limit: -1}}\n", "limit"),
    Case("schema", "bool in attn_keep", BASE + "steps:\n  - prune: {attn_keep: [true], mlp_keep: [1]}\n", "attn_keep"),
]

OVERRIDES = [
    Case("set", "no equals sign", PRUNE, "--set 'seed'", args=("--set", "seed")),
    Case("set", "value not YAML", PRUNE, "--set 'seed=[1'", args=("--set", "seed=[1")),
    Case("set", "index past the steps", PRUNE, "steps.9.prune.ratio", args=("--set", "steps.9.prune.ratio=0.1")),
    Case("set", "string for an integer", PRUNE, "field 'seed'", args=("--set", "seed=abc")),
    Case("set", "bool for an integer", PRUNE, "calibration.samples", args=("--set", "calibration.samples=true")),
    Case("set", "into a scalar", PRUNE, "model.x", args=("--set", "model.x=1")),
    Case("set", "bad regex", PRUNE, "steps.0.quantize.modules", args=("--set", "steps.0={quantize: {modules: '('}}")),
]

MODEL = [
    Case("model", "missing path", "model: /nonexistent/model\nevaluation: null\n", "/nonexistent/model"),
    Case(
        "model",
        "folder without config.json",
        "model: '{tmp}/m'\nevaluation: null\n",
        "no config.json",
        setup=_mkdir("m"),
    ),
    Case(
        "model",
        "folder without weights",
        "model: '{tmp}/m'\nevaluation: null\n",
        "has no weights",
        setup=_model_folder({"model_type": "llama"}, weights=False),
    ),
    Case(
        "model",
        "garbage .gguf",
        "model: '{tmp}/x.gguf'\nevaluation: null\n",
        "x.gguf",
        setup=_write("x.gguf", b"GGUF" + b"\xff" * 64),
    ),
    Case(
        "model",
        "GGUF v3 header, garbage after",
        "model: '{tmp}/y.gguf'\nevaluation: null\n",
        "y.gguf",
        setup=_write("y.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64),
    ),
    Case(
        "model", "text file as model", "model: '{tmp}/x.txt'\nevaluation: null\n", "x.txt", setup=_write("x.txt", "hi")
    ),
    Case(
        "model",
        "invalid config.json",
        "model: '{tmp}/m'\nevaluation: null\n",
        "config.json",
        setup=_model_folder("{not json"),
        before_load=False,
    ),
    Case(
        "model",
        "config.json of an unknown model type",
        "model: '{tmp}/m'\nevaluation: null\n",
        "'{tmp}/m'",
        setup=_model_folder({"model_type": "no-such-type", "architectures": ["LlamaForCausalLM"]}),
        before_load=False,
    ),
]

DATA = [
    Case(
        "data",
        "calibration file missing",
        PRUNE + "calibration: {data: /nonexistent/cal.txt}\n",
        "/nonexistent/cal.txt",
    ),
    Case(
        "data",
        "calibration file is a folder",
        PRUNE + "calibration: {data: '{tmp}/d.txt'}\n",
        "d.txt",
        setup=_mkdir("d.txt"),
    ),
    Case(
        "data",
        "calibration file not UTF-8",
        PRUNE + "calibration: {data: '{tmp}/c.txt'}\n",
        "c.txt",
        setup=_write("c.txt", b"\xff\xfe\x00"),
    ),
    Case(
        "data",
        "empty calibration file",
        PRUNE + "calibration: {data: '{tmp}/c.txt'}\n",
        "c.txt",
        setup=_write("c.txt", ""),
    ),
    Case(
        "data",
        "eval data missing",
        "model: {model}\nevaluation: {perplexity: {data: /nonexistent/e.txt}, lm_eval: null}\n",
        "/nonexistent/e.txt",
    ),
]

OUTPUT = [
    Case("output", "below a file", PRUNE, "'{tmp}/f'", args=("--out", "{tmp}/f/model"), setup=_write("f", "x")),
    Case(
        "output", "exists, no --overwrite", PRUNE, "already exists", args=("--out", "{tmp}/o"), setup=_mkdir("o", "x")
    ),
    Case(
        "output",
        "--overwrite of a file",
        PRUNE,
        "is a file",
        args=("--out", "{tmp}/o", "--overwrite"),
        setup=_write("o", "x"),
    ),
    Case(
        "output",
        "--overwrite of a foreign folder",
        PRUNE,
        "not a Secateurs checkpoint",
        args=("--out", "{tmp}/o", "--overwrite"),
        setup=_mkdir("o", "thesis.tex"),
    ),
    Case("output", "the working directory", PRUNE, "working directory", args=("--out", ".", "--overwrite")),
    Case(
        "output", "a parent of the working directory", PRUNE, "working directory", args=("--out", "..", "--overwrite")
    ),
    Case("output", "a name of 300 characters", PRUNE, "too long", args=("--out", "{tmp}/" + "n" * 300)),
    Case("output", "on a read-only file system", PRUNE, "not writable", args=("--out", "/proc/secateurs-out")),
    Case("output", "the root folder", PRUNE, "working directory", args=("--out", "/", "--overwrite")),
    Case(
        "output",
        "not writable",
        PRUNE,
        "not writable",
        args=("--out", "{tmp}/ro/model"),
        setup=_read_only,
        root_ok=False,
    ),
]

TASKS = [
    Case(
        "tasks",
        "unknown task",
        "model: {model}\nevaluation: {perplexity: null, lm_eval: {tasks: [no_such_task_xyz]}}\n",
        "no_such_task_xyz",
    ),
    Case(
        "tasks",
        "task YAML path",
        "model: {model}\nevaluation: {perplexity: null, lm_eval: {tasks: ['{tmp}/t/evil.yaml']}}\n",
        "evil.yaml",
        setup=_write("t/evil.yaml", "task: evil\ncustom_dataset: !function evil.load\n"),
    ),
    Case(
        "tasks",
        "task folder path",
        "model: {model}\nevaluation: {perplexity: null, lm_eval: {tasks: ['{tmp}/t']}}\n",
        "--trust-task-code",
        setup=_write("t/evil.yaml", "task: evil\n"),
    ),
    Case(
        "tasks",
        "glob pattern",
        "model: {model}\nevaluation: {perplexity: null, lm_eval: {tasks: ['secateurs_*']}}\n",
        "secateurs_*",
    ),
]

CASES = YAML + SCHEMA + OVERRIDES + MODEL + DATA + OUTPUT + TASKS
