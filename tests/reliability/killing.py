"""kill -9 loop: ``secateurs run --overwrite`` into one folder, killed at random moments (half of them just after
its temporary folder appears, i.e. inside the write window). After every kill the output is either absent or a
complete checkpoint that verifies (sha256 included); every leftover temporary folder must be removed or reported
by a later run, and none may remain after a final uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RECIPE = """model: {model}
evaluation: null
calibration: {{samples: 4, seq_len: 16, batch_size: 4}}
steps:
  - prune: {{ratio: 0.3}}
"""


@dataclass
class KillReport:
    kills: int = 0  # processes killed before they finished
    in_window: int = 0  # of which killed while their temporary folder existed (inside the write window)
    finished: int = 0  # runs that completed before the kill landed
    partial: int = 0  # times the output folder existed but did not verify
    leftovers_seen: set[str] = field(default_factory=set)  # temporary folders found after kills
    unreported: list[str] = field(default_factory=list)  # leftovers never mentioned by a later run
    remaining: list[str] = field(default_factory=list)  # leftovers still there after the final run
    problems: list[str] = field(default_factory=list)


def _leftovers(work: Path) -> set[str]:
    return {str(p) for p in work.iterdir() if p.name.startswith((".out.tmp-", ".out.old-"))}


def _start(recipe: Path, work: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(work / "out"), "--overwrite"]
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _writing(proc: subprocess.Popen[str], work: Path) -> bool:
    """Whether ``proc`` has its own temporary folder (named after its process id; a leftover of an earlier run
    does not count)."""
    return any(p.name.startswith(f".out.tmp-{proc.pid}-") for p in work.iterdir())


def _wait_for_tmp(proc: subprocess.Popen[str], work: Path, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if _writing(proc, work):
            return True
        time.sleep(0.002)
    return False


def _output_state(out: Path) -> str | None:
    """None when ``out`` is absent or a checkpoint that verifies; the problem otherwise."""
    from compress.verify import verify_checkpoint
    from quant.errors import InputError

    if not out.exists():
        return None
    try:
        verify_checkpoint(out, hashes=True)
    except InputError as err:
        return str(err)
    return None


def kill_loop(model_dir: Path, work: Path, kills: int, seed: int = 0, run_seconds: float = 30.0) -> KillReport:
    """``kills`` killed runs, then one uninterrupted run; ``run_seconds`` bounds one run (for the random kills)."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model_dir))
    report = KillReport()
    outputs: list[str] = []
    for index in range(kills):
        proc = _start(recipe, work)
        if index % 2 == 0:  # inside or around the write window (however long the run takes to get there)
            _wait_for_tmp(proc, work, 600.0)
            time.sleep(rng.uniform(0.0, 0.1))
        else:  # anywhere in the run
            time.sleep(rng.uniform(0.0, run_seconds))
        if proc.poll() is None:
            writing = _writing(proc, work)
            proc.send_signal(signal.SIGKILL)
            report.kills += 1
            report.in_window += writing
        else:
            report.finished += 1
        outputs.append(proc.communicate()[0])
        problem = _output_state(work / "out")
        if problem is not None:
            report.partial += 1
            report.problems.append(f"after kill {index}: {problem}")
        report.leftovers_seen |= _leftovers(work)
    final = _start(recipe, work)
    outputs.append(final.communicate(timeout=600)[0])
    if final.returncode != 0:
        report.problems.append(f"final run exit {final.returncode}: {outputs[-1][-500:]}")
    if _output_state(work / "out") is not None or not (work / "out").exists():
        report.partial += 1
        report.problems.append("final run: no verified checkpoint")
    said = "\n".join(outputs)
    report.unreported = sorted(p for p in report.leftovers_seen if p not in said)
    report.remaining = sorted(_leftovers(work))
    return report
