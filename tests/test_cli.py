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


@pytest.mark.parametrize("argv", [["serve"], ["demo"], ["explore"], *(["bench", name] for name in sorted(cli.BENCHMARKS))])
def test_every_help_names_each_options_default(argv, capsys, monkeypatch):
    """Every option with a default says it in --help, whichever subcommand prints it."""
    import argparse

    shown = []
    real = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: (shown.append(self), real(self, file))[1])
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--help"])
    capsys.readouterr()
    assert stopped.value.code == 0 and len(shown) == 1
    parser = shown[0]
    options = [a for a in parser._actions
               if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.help != argparse.SUPPRESS]
    assert options or argv == ["explore"], argv  # explore's options are a required path and the traces
    for action in options:
        assert "default" in parser._get_formatter()._get_help_string(action), (argv, action.dest)


@pytest.mark.parametrize("argv", [["bench", "throughput", "--concurrency", "0"], ["bench", "accuracy", "--n", "-1"],
                                  ["demo", "--n", "0"]])
def test_counts_below_one_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_bench_serve_takes_the_clients_base_url_and_says_when_no_server_answers(capsys):
    from dengine.bench.serve_load import server_root

    assert server_root("http://127.0.0.1:8123/v1") == server_root("http://127.0.0.1:8123/v1/") == "http://127.0.0.1:8123"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bench", "serve", "--url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "no dengine server answers at http://127.0.0.1:9/v1/models" in err
