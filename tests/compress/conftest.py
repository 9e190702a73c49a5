"""Tests never read or write the user's dense-evaluation cache (a hit would skip the code under test)."""

import pytest


@pytest.fixture(autouse=True)
def _no_dense_eval_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECATEURS_EVAL_CACHE", "0")
