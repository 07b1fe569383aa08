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


@pytest.mark.parametrize("options, message", [
    (["--cache-policy", "fast"], "cache_policy 'fast' is unknown"),
    (["--cache-config", "{tau: 1}"], "--cache-config is not JSON"),
    (["--cache-config", '{"tau": -1}'], "cache_config for policy 'entropy'"),
    (["--model", "nope"], "--model: 'nope' is neither"),
    (["--dtype", "int3"], "--dtype: dtype 'int3'"),
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
])
def test_serve_refuses_bad_options_before_starting_ray(options, message, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_serve", lambda *a: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", *options])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and "Traceback" not in err


def test_serve_refuses_a_port_in_use(monkeypatch, capsys):
    import socket

    monkeypatch.setattr(cli, "_serve", lambda *a: pytest.fail("Ray was started"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit):
            cli.main(["serve", "--port", str(port)])
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_serve_hands_checked_options_to_the_app(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_serve", lambda args, defaults, engine: seen.append((defaults, engine)))
    cli.main(["serve", "--model", "llada-sudoku", "--cache-config", '{"tau": 0.1}', "--port", "0"])
    assert seen == [({"gen_length": 24, "block_length": 24},
                     {"dtype": "bfloat16", "cache_policy": "entropy", "max_num_seqs": 64, "cache_config": {"tau": 0.1}})]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    options = buffer.getvalue().split("options:", 1)[1]  # every option of serve documents its default
    for option in ("--replicas", "--host", "--port", "--dtype", "--cache-policy", "--max-num-seqs"):
        described = options.split(f"  {option}", 1)[1].split("\n  --", 1)[0]
        assert "default" in described, f"{option} has no default in --help: {described!r}"
