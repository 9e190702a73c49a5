"""kill -9 loop on a tiny model (see tests/reliability/killing.py): prints kills, partial checkpoints and leftover
accounting.

    python scripts/kill_loop.py --kills 45
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import build_tiny  # noqa: E402
from tests.reliability.killing import kill_loop  # noqa: E402
from tests.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=45)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-seconds", type=float, default=20.0, help="random kills land in [0, this]")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="secateurs-kill-"))
    build_tiny("llama", num_hidden_layers=4).save_pretrained(root / "tiny")
    build_tiny_tokenizer(root / "tiny")
    start = time.perf_counter()
    report = kill_loop(root / "tiny", root / "work", args.kills, args.seed, args.run_seconds)
    print(f"runs started: {args.kills + 1} ({time.perf_counter() - start:.0f} s)")
    print(f"killed before finishing: {report.kills}; finished before the kill landed: {report.finished}")
    print(f"  killed inside the write window (temporary folder present): {report.in_window}")
    print(f"partial or unverifiable checkpoints seen: {report.partial}")
    print(f"leftover temporary folders seen after kills: {len(report.leftovers_seen)}")
    print(f"  never reported by a later run: {len(report.unreported)}")
    print(f"  still present after the final run: {len(report.remaining)}")
    for problem in report.problems:
        print("PROBLEM", problem)
    return 0 if report.partial == 0 and not report.unreported and not report.remaining else 1


if __name__ == "__main__":
    sys.exit(main())
