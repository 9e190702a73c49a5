"""Global CLI flags: ``--version`` and ``-v`` before the ``search`` subcommand (it used to raise KeyError)."""

import pytest

from compress import cli


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("secateurs ")


def test_verbose_flag_before_search_reaches_the_search_parser(monkeypatch):
    import search.cli

    seen: list[list[str]] = []
    monkeypatch.setattr(search.cli, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["-v", "search", "recipe.yaml", "--trials", "3"]) == 0
    assert cli.main(["search", "recipe.yaml"]) == 0
    assert seen == [["recipe.yaml", "--trials", "3", "-v"], ["recipe.yaml"]]
