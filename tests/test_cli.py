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


@pytest.mark.parametrize("argv, count", [([], 12), (["--model", "llada-sudoku"], 500), (["--model", "dream-chain",
                                                                                            "--n", "3"], 3)])
def test_the_main_job_decodes_its_tasks_default_number_of_problems(argv, count, monkeypatch):
    """`python -m dengine`: 12 chains on llada-chain by default (239 tokens one at a time each), 500 Sudoku
    puzzles on a Sudoku model, or --n."""
    import dengine.__main__ as main_job

    seen = []

    def compare(llm, problems, base, runs):
        seen.append(len(problems))
        raise SystemExit(0)  # the decoding itself is the accuracy harness's (tests/test_bench.py)

    monkeypatch.setattr(main_job, "compare", compare)
    with pytest.raises(SystemExit):
        main_job.main(argv)
    assert seen == [count]


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
                     {"dtype": "auto", "cache_policy": "entropy", "max_num_seqs": 64, "cache_config": {"tau": 0.1}})]
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


def test_quiet_ray_logs_writes_what_ray_prints_without_colour_codes_when_the_output_is_not_a_terminal(monkeypatch):
    import io
    import logging
    import sys

    from ray._private import ray_logging, worker
    from ray._private.log import PlainRayHandler

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    handler = PlainRayHandler()  # Ray's driver handler, made at `import ray`: it keeps the sys.stderr of that time
    logger = logging.getLogger("ray.dengine_test")
    logger.addHandler(handler)
    try:
        cli.quiet_ray_logs()
        cli.quiet_ray_logs()  # twice: one wrapper, not two
        assert isinstance(sys.stdout, cli.WithoutColour) and not isinstance(sys.stdout.stream, cli.WithoutColour)
        # a replica's line as the driver prints it (coloured pid prefix), a deduplicated one ("[repeated 2x
        # across cluster]" in green, what CI once caught), and the driver's coloured dashboard address
        line = {"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": False, "actor_name": "Replica"}
        worker.print_worker_logs({**line, "lines": ["engine ready"]}, sys.stdout)
        state = ray_logging.DedupState(timestamp=0, count=2, line="queue length deadline", metadata=line,
                                       sources=set())
        print(state.formatted(), file=sys.stdout)
        logger.warning("View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m")
    finally:
        logger.removeHandler(handler)
    printed = out.getvalue() + err.getvalue()
    assert "\x1b[" not in printed, printed
    assert "(Replica pid=4242) engine ready" in printed and "queue length deadline [repeated 2x across cluster]" in printed
    assert "View the dashboard at http://127.0.0.1:8265" in printed
    # a terminal keeps its colours
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    cli.quiet_ray_logs()
    assert not isinstance(sys.stdout, cli.WithoutColour)
