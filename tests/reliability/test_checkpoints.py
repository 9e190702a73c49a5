"""Damaged checkpoints: one-line errors naming the file or tensor, never a traceback or silent garbage."""

from __future__ import annotations

import pytest

from tests.reliability.damage import DAMAGES, Damage, run_damage, write_reference

PAIRS = [(d, c) for d in DAMAGES for c in d.commands]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("damage, command", PAIRS, ids=[f"{c}:{d.name}" for d, c in PAIRS])
def test_damaged_checkpoint(damage: Damage, command: str, references, tmp_path):
    result = run_damage(damage, references, tmp_path / "work", command)
    assert result.problem is None, result.problem


def test_intact_checkpoint_loads(references, tmp_path, capsys):
    from compress.cli import main

    for folder in references.values():
        assert main(["info", str(folder)]) == 0
        assert main(["info", str(folder), "--no-verify-hashes"]) == 0
