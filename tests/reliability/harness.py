"""Run one bad-input case in-process and record what the user would see: exit code, stderr lines (log lines
included), whether the model was loaded, and every file created, changed or removed under the case folder."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from tests.reliability.corpus import Case


@dataclass
class Outcome:
    code: int
    lines: list[str]  # non-empty stderr lines, log lines included
    loaded: bool  # the model was loaded
    changed: list[str]  # paths created, modified or removed

    def verdict(self, case: Case, tmp: Path) -> str | None:
        """None when the case meets the bar, else what is wrong."""
        needle = case.needle.replace("{tmp}", str(tmp))
        if self.code != 2:
            return f"exit code {self.code}"
        if len(self.lines) != 1:
            return f"{len(self.lines)} stderr lines: {self.lines[:3]}"
        if needle not in self.lines[0]:
            return f"error does not name {needle!r}: {self.lines[0]}"
        if self.changed:
            return f"wrote {self.changed[:3]}"
        if case.before_load and self.loaded:
            return "loaded the model before failing"
        return None


def snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                stat = path.lstat()
                found[str(path)] = (path.is_dir(), stat.st_size, 0 if path.is_dir() else stat.st_mtime_ns)
    return found


def prepare(case: Case, tmp: Path, model_dir: Path) -> list[str]:
    """Write the case's files into ``tmp``; the ``secateurs`` arguments to run."""
    if case.setup is not None:
        case.setup(tmp)
    recipe = tmp / "r.yaml"
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if "--recipe-is-dir" in args:
        recipe.mkdir()
        args.remove("--recipe-is-dir")
    elif "--recipe-missing" in args:
        args.remove("--recipe-missing")
    elif isinstance(case.recipe, bytes):
        recipe.write_bytes(case.recipe)
    else:
        recipe.write_text(case.recipe.replace("{model}", str(model_dir)).replace("{tmp}", str(tmp)))
    if "--out" not in args:
        args += ["--out", str(tmp / "out" / "model")]
    return ["run", str(recipe), *args]


def run_case(case: Case, tmp: Path, model_dir: Path) -> Outcome:
    """Run ``secateurs run`` on the case inside ``tmp`` (also the working directory)."""
    from compress import cli, pipeline

    argv = prepare(case, tmp, model_dir)
    before = snapshot(tmp, model_dir)
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("secateurs")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # what the CLI shows (logging.basicConfig(level=INFO) in compress.cli)
    loaded = []
    real_load = pipeline.load_model

    def load_model(*args, **kwargs):
        loaded.append(True)
        return real_load(*args, **kwargs)

    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with mock.patch.object(pipeline, "load_model", load_model), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.chdir(cwd)
        logger.removeHandler(handler)
        logger.setLevel(level)
    after = snapshot(tmp, model_dir)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return Outcome(code, [line for line in err.getvalue().splitlines() if line.strip()], bool(loaded), changed)


def fresh(tmp: Path) -> Path:
    """An empty case folder (permissions restored first so that it can be removed)."""
    if tmp.exists():
        for dirpath, _, _ in os.walk(tmp):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
