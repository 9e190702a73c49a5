"""The output folder: checked before any work, replaced only when it is ours, and cleaned of crashed runs' leftovers.

A checkpoint is written to a hidden sibling ``.<name>.tmp-<pid>-<random>`` and renamed into place (an old
checkpoint moves to ``.<name>.old-<pid>-<random>`` first, then is deleted). A run killed mid-write leaves such a
folder behind; the next run into the same place removes it when the process that made it is gone, and reports it
(with its size) otherwise. Nothing outside the output folder and these siblings is ever written or deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compress.errors import shown
from quant.errors import InputError

log = logging.getLogger("secateurs")

CHECKPOINT_MARKERS = ("config.json", "secateurs.json")
_LEFTOVER = re.compile(r"\.(tmp|old)-(?:(\d+)-)?")


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work when ``out_dir`` cannot be written, or exists and may not be replaced.

    ``overwrite`` replaces only an empty folder or a Secateurs checkpoint (a folder with config.json and
    secateurs.json); a file, a link or any other folder is an error.
    """
    where = f"output {shown(str(out_dir))}"
    too_long = [part for part in out_dir.parts if len(os.fsencode(part)) > MAX_NAME_BYTES - 32]  # room for .tmp-…
    if too_long or len(os.fsencode(str(out_dir.absolute()))) > MAX_PATH_BYTES:
        raise InputError(f"{where}: the path or one of its names is too long for the file system")
    resolved = out_dir.expanduser().resolve()
    if not resolved.name or resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise InputError(f"{where} is the working directory or one of its parents: name a new folder")
    if out_dir.is_symlink():
        raise InputError(f"{where} is a symbolic link: name a folder")
    if out_dir.exists():
        if not overwrite:
            raise InputError(f"{where} already exists (set output.overwrite: true, or --overwrite, or another --out)")
        if not out_dir.is_dir():
            raise InputError(f"{where} is a file, not a checkpoint folder: --overwrite replaces only those")
        if any(out_dir.iterdir()) and not is_checkpoint(out_dir):
            raise InputError(
                f"{where} is a folder that is not a Secateurs checkpoint (no config.json + secateurs.json): "
                "--overwrite replaces only a checkpoint or an empty folder"
            )
    ancestor = existing_ancestor(resolved.parent)
    if not ancestor.is_dir():
        raise InputError(f"{where} cannot be created: {shown(str(ancestor))} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only(ancestor) or not _can_create(ancestor):
        raise InputError(f"{where} cannot be created: {shown(str(ancestor))} is not writable")


MAX_NAME_BYTES = 255  # NAME_MAX of common file systems
MAX_PATH_BYTES = 4000  # below PATH_MAX (4096) with room for the checkpoint's file names


def _can_create(folder: Path) -> bool:
    """Whether a folder can be made in ``folder`` (tried: root passes os.access even where mkdir fails, e.g.
    /proc); the empty probe folder is removed at once."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".secateurs-probe-", dir=folder))
    except OSError:
        return False
    return True


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): os.access decided
        return False


def is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_MARKERS)


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a file or folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def temp_sibling(out_dir: Path, kind: str = "tmp") -> Path:
    """A new hidden folder next to ``out_dir`` named after it, this process' id and a random part."""
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-{os.getpid()}-", dir=out_dir.parent))


def umask() -> int:
    """The process' umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give ``folder`` (made 0700 by mkdtemp) the mode a plain ``mkdir`` would have given it."""
    folder.chmod(0o777 & ~umask())


@dataclass(frozen=True)
class Leftover:
    path: Path
    bytes: int
    pid: int | None
    removed: bool


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out_dir: Path) -> list[Leftover]:
    """Remove temporary siblings of ``out_dir`` left by crashed runs (process gone); report the others.

    Each one is logged with its size; the list says what was found and what was removed.
    """
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    prefix = f".{out_dir.name}."
    found = []
    for path in sorted(parent.iterdir()):
        if not path.name.startswith(prefix) or not path.is_dir() or path.is_symlink():
            continue
        match = _LEFTOVER.match(path.name[len(prefix) - 1 :])
        if match is None:
            continue
        pid = int(match.group(2)) if match.group(2) else None
        if pid == os.getpid():
            continue  # this run's own staging folder (a streamed run stages layers next to the output)
        size = folder_bytes(path)
        if pid is not None and not _alive(pid):
            if match.group(1) == "old" and not out_dir.exists() and is_checkpoint(path / "old"):
                # killed between moving the old checkpoint aside and moving the new one in: put the old one back
                (path / "old").rename(out_dir)
                log.warning("restored %s from %s (a run replacing it was killed)", out_dir, path)
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s (%s bytes) left by a crashed run (process %d)", path, f"{size:,}", pid)
            found.append(Leftover(path, size, pid, removed=True))
        else:
            log.warning(
                "found %s (%s bytes): a temporary folder of another run writing here (process %s), not removed",
                path,
                f"{size:,}",
                pid if pid is not None else "unknown",
            )
            found.append(Leftover(path, size, pid, removed=False))
    return found
