"""Run the bad-input corpus (tests/reliability/corpus.py) and the damaged-checkpoint classes, and print per class
how many cases meet the bar: exit code 2, one stderr line naming the field/path/tensor, nothing written (and,
for validation cases, the model never loaded).

    python scripts/reliability_corpus.py [--show] [--skip-checkpoints]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import build_tiny  # noqa: E402
from tests.reliability.corpus import CASES  # noqa: E402
from tests.reliability.harness import fresh, run_case  # noqa: E402
from tests.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print every case's error line")
    parser.add_argument("--skip-checkpoints", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="secateurs-corpus-"))
    model_dir = root / "tiny"
    build_tiny("llama", num_hidden_layers=4).save_pretrained(model_dir)
    build_tiny_tokenizer(model_dir)
    total, ok = Counter(), Counter()
    failures = []
    root_user = hasattr(os, "geteuid") and os.geteuid() == 0
    for index, case in enumerate(CASES):
        if root_user and not case.root_ok:
            print(f"skipped (root): {case.kind}: {case.name}")
            continue
        tmp = fresh(root / f"case{index}")
        outcome = run_case(case, tmp, model_dir)
        problem = outcome.verdict(case, tmp)
        total[case.kind] += 1
        ok[case.kind] += problem is None
        if problem is not None:
            failures.append(f"{case.kind}: {case.name}: {problem}")
        if args.show:
            print(f"[{case.kind}] {case.name}: exit {outcome.code}: {outcome.lines[0] if outcome.lines else ''}")
    if not args.skip_checkpoints:
        from tests.reliability.damage import DAMAGES, run_damage, write_reference

        reference = write_reference(root / "reference")
        for damage in DAMAGES:
            for command in damage.commands:
                result = run_damage(damage, reference, root / "damaged", command)
                kind = f"checkpoint ({command})"
                total[kind] += 1
                ok[kind] += result.problem is None
                if result.problem is not None:
                    failures.append(f"{kind}: {damage.name}: {result.problem}")
                if args.show:
                    print(f"[{kind}] {damage.name}: exit {result.code}: {result.line}")
    print(f"\n{'class':28s} {'cases':>5s} {'meet the bar':>12s}")
    for kind in total:
        print(f"{kind:28s} {total[kind]:5d} {ok[kind]:7d} ({100 * ok[kind] / total[kind]:.0f} %)")
    n, k = sum(total.values()), sum(ok.values())
    print(f"{'all':28s} {n:5d} {k:7d} ({100 * k / n:.0f} %)")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
