"""Which lm-eval tasks a recipe may name, resolved before any work.

A recipe is data: its ``evaluation.lm_eval.tasks`` are names, either of the tasks shipped in ``compress/tasks`` or
of tasks registered in the installed lm-eval. A task folder's YAML can run Python (``!function`` imports the
module next to it), so a folder of one's own tasks is used only when the user passes it on the command line with
``--trust-task-code DIR`` (or calls :func:`trust_task_code`), never because a recipe names it.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

from compress.corpus import task_dir
from compress.errors import shown
from quant.errors import InputError

log = logging.getLogger("secateurs")

TRUSTED_TASK_DIRS: list[Path] = []  # folders passed with --trust-task-code: their task YAMLs may run Python
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def task_name(value: str) -> str:
    """``value`` when it is a task name (not a path or pattern); ValueError naming the opt-in otherwise."""
    if not _NAME.match(value) or value.endswith((".yaml", ".yml", ".py")):
        raise ValueError(
            "not an lm-eval task name (a path or pattern? a task folder runs code: pass it with --trust-task-code DIR "
            "and name its tasks)"
        )
    return value


def trust_task_code(folder: str | Path) -> Path:
    """Make the tasks in ``folder`` available; their YAML may import and run Python from that folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"--trust-task-code {shown(str(folder))}: not a folder")
    resolved = path.resolve()
    if resolved not in TRUSTED_TASK_DIRS:
        TRUSTED_TASK_DIRS.append(resolved)
        log.warning("running task code from %s (--trust-task-code)", resolved)
    return resolved


def task_paths() -> tuple[str, ...]:
    """The shipped task folder and the trusted ones, as lm-eval's ``include_path``."""
    return (str(task_dir()), *(str(p) for p in TRUSTED_TASK_DIRS))


@functools.cache
def _manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def task_manager() -> Any:
    """lm-eval's TaskManager over its registered tasks, the shipped ones and the trusted folders (built once)."""
    return _manager(task_paths(), True)


def resolve_tasks(tasks: list[str], field: str = "evaluation.lm_eval.tasks") -> None:
    """InputError naming the first task that is neither shipped, in a trusted folder, nor registered in lm-eval.

    Only names outside the shipped and trusted folders build lm-eval's full index (seconds), once per process.
    """
    for name in tasks:
        try:
            task_name(name)
        except ValueError as err:
            raise InputError(f"{field}: {shown(name)}: {err}") from None
    local = set(_manager(task_paths(), False).all_tasks)
    unknown = [name for name in tasks if name not in local]
    if unknown:
        registered = set(task_manager().all_tasks)
        for name in unknown:
            if name not in registered:
                raise InputError(
                    f"{field}: unknown lm-eval task {shown(name)} (not shipped, not registered in the installed "
                    "lm-eval, not in a --trust-task-code folder)"
                )
