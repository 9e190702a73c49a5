"""The bad-input corpus: every case exits with code 2, prints one line naming the field, path or tensor, writes
nothing, and (validation cases) fails before the model is loaded."""

from __future__ import annotations

import os

import pytest

from tests.reliability.corpus import CASES, Case
from tests.reliability.harness import fresh, run_case

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}:{c.name}" for c in CASES])
def test_bad_input(case: Case, tmp_path, tiny4_dir):
    if ROOT and not case.root_ok:
        pytest.skip("permissions do not bind root")
    tmp = fresh(tmp_path / "case")
    outcome = run_case(case, tmp, tiny4_dir)
    assert outcome.verdict(case, tmp) is None, outcome.verdict(case, tmp)


def test_every_class_has_cases():
    kinds = {case.kind for case in CASES}
    assert kinds == {"yaml", "schema", "set", "model", "data", "output", "tasks"}
    assert len({(c.kind, c.name) for c in CASES}) == len(CASES)
