"""kill -9 during ``secateurs run``: never a partial checkpoint, every leftover removed or reported.

A few kills here (each run is a fresh process); ``scripts/kill_loop.py`` runs the full count."""

from __future__ import annotations

from tests.reliability.killing import kill_loop


def test_kill_loop_leaves_no_partial_checkpoint_and_no_unreported_leftover(tiny4_dir, tmp_path):
    report = kill_loop(tiny4_dir, tmp_path / "work", kills=3, seed=0, run_seconds=8.0)
    assert report.kills >= 2 and report.in_window >= 1, report  # the loop really killed runs mid-write
    assert report.partial == 0, report.problems
    assert report.unreported == [], report.unreported
    assert report.remaining == [], report.remaining
    assert not report.problems, report.problems
