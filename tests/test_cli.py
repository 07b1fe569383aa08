"""`dengine`'s argument parsing: every subcommand's own options and --help reach it."""

from __future__ import annotations

import pytest

from dengine import cli


@pytest.mark.parametrize("argv, target", [
    (["demo", "--n", "5"], "dengine.__main__.main"),
    (["demo", "--model", "dream-sudoku", "--n", "3"], "dengine.__main__.main"),
    (["explore", "trace.json", "-o", "page.html"], "dengine.explore.main"),
    (["bench", "headline", "--n", "4", "--wall-n", "0"], "dengine.bench.headline.main"),
])
def test_subcommands_hand_their_arguments_on(argv, target, monkeypatch):
    seen = []
    module, _, name = target.rpartition(".")
    monkeypatch.setattr(f"{module}.{name}", lambda rest: seen.append(rest))
    cli.main(argv)
    assert seen == [argv[1:] if argv[0] != "bench" else argv[2:]]


@pytest.mark.parametrize("argv, shows", [
    (["demo", "--help"], "--aggressive"), (["explore", "--help"], "--output"),
    (["bench", "drift", "--help"], "--sampler"), (["bench", "--help"], "headline"),
])
def test_help_is_the_subcommands_own(argv, shows, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 0 and shows in capsys.readouterr().out


def test_serve_refuses_unknown_options(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--bogus"])
    assert stopped.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
