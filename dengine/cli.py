"""The `dengine` command.

    dengine demo [--model M] [--n 64]                      the main job (same as `python -m dengine`)
    dengine serve [--model M] [--replicas N] [--port P]    the OpenAI-compatible server on Ray Serve
    dengine run-batch -i IN.jsonl -o OUT.jsonl [...]       an OpenAI batch file, offline (Ray Data with --replicas)
    dengine bench {accuracy,policies,throughput,serve,drift,chaos,width,headline,batch} ... benchmarks (`dengine bench chaos --help`)
    dengine explore TRACE.json [...] -o page.html         the denoising trace explorer as one offline page
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time

from dengine.cli_args import DefaultsHelpFormatter, positive_int


BENCHMARKS = {"accuracy": "dengine.bench.accuracy", "policies": "dengine.bench.policies",
              "throughput": "dengine.bench.throughput", "serve": "dengine.bench.serve_load",
              "drift": "dengine.bench.drift", "chaos": "dengine.bench.chaos", "width": "dengine.bench.width",
              "headline": "dengine.bench.headline", "batch": "dengine.bench.batch"}


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The model and engine options `dengine serve` and `dengine run-batch` share."""
    parser.add_argument("--model", default=None, help="checkpoint folder or embedded model name (default llada-sudoku)")
    parser.add_argument("--served-model-name", default=None, help="the `model` requests send (default: folder name)")
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (default 1)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default 1 if CUDA, else 0)")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--dtype", default="auto", help="auto (default: bfloat16, or float32 on a CPU without bf16 "
                        "hardware when it fits), bfloat16, float16, float32 or float64")
    parser.add_argument("--cache-policy", default="entropy",
                        help="none, prefix, dual, entropy (default), dllm or d2cache (docs/sampling.md)")
    parser.add_argument("--cache-config", default=None, help='the policy\'s options as JSON, e.g. \'{"tau": 0.05, "k": 8}\'')
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together per replica (default 64)")
    parser.add_argument("--kv-cache-memory", type=_memory, default=None,
                        help="KV pool per replica: bytes (an integer), or a fraction of the device's total memory "
                             "(default: what --max-num-seqs canvases of the model's longest context need, capped by "
                             "half the RAM left after the weights on CPU, the free GPU memory above a 10%% reserve)")
    parser.add_argument("--gen-length", type=int, default=None,
                        help="when a request sets no max_tokens (default: the model's task's, else 128)")
    parser.add_argument("--block-length", type=int, default=None, help="default: the model's task's, else 32")


def check_engine_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """The options of add_engine_options checked before Ray starts: (request defaults, engine arguments), or a
    ValueError naming the option."""
    from dengine.assets import resolve_model
    from dengine.models.loader import resolve_dtype
    from dengine.sampling_params import SamplingParams
    from dengine.scheduler.policies import make_policy
    from dengine.tasks import generation_lengths, task_of_folder

    for name in ("replicas", "max_num_seqs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        folder = resolve_model(args.model)
        if args.dtype != "auto":
            resolve_dtype(args.dtype)
    except ValueError as exc:
        raise ValueError(f"--{'dtype' if 'dtype' in str(exc) else 'model'}: {exc}") from None
    config = None
    if args.cache_config:
        try:
            config = json.loads(args.cache_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--cache-config is not JSON ({exc}); write it as '{{\"tau\": 0.05, \"k\": 8}}'") from None
    make_policy(args.cache_policy, config)  # names an unknown policy or a bad option
    gen_length, block_length = generation_lengths(task_of_folder(folder), args.gen_length, args.block_length)
    defaults = {"gen_length": gen_length, "block_length": block_length}
    SamplingParams(**defaults)
    engine_kwargs = {"dtype": args.dtype, "cache_policy": args.cache_policy, "max_num_seqs": args.max_num_seqs}
    if config is not None:
        engine_kwargs["cache_config"] = config
    if args.kv_cache_memory is not None:
        engine_kwargs["kv_cache_memory"] = args.kv_cache_memory
    return defaults, engine_kwargs


def _check_serve_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """Every option of `dengine serve` checked before Ray starts: (request defaults, engine arguments), or a
    ValueError naming the option."""
    import socket

    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be at least 0, got {args.grace_period}")
    checked = check_engine_options(args)
    if args.ray_address is None:  # a local Serve binds host:port itself; fail before starting Ray
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            # as uvicorn binds: a port a just-stopped server left in TIME_WAIT is free, a listening one is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((args.host, args.port))
            except OSError as exc:
                raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there ({exc.strerror}); "
                                 "is another server running? pick another --port") from None
    return checked


def _serve(args: argparse.Namespace, defaults: dict, engine_kwargs: dict) -> None:
    import ray
    from ray import serve

    from dengine.assets import resolve_model
    from dengine.serve.deployment import build_app, ray_serving_environment
    from dengine.tasks import task_of_folder

    app = build_app(args.model, replicas=args.replicas, routers=args.routers, num_cpus=args.num_cpus,
                    num_gpus=args.num_gpus, model_name=args.served_model_name, defaults=defaults, **engine_kwargs)
    ray_serving_environment()
    quiet_ray_logs()
    # a terminal's Ctrl-C signals the whole foreground process group: the processes ray.init starts inherit
    # SIGINT ignored, so the HTTP proxy and the replicas keep serving while this process drains them
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.init(address=args.ray_address, ignore_reinit_error=True)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, whose own handler dumps a stack and aborts
    try:
        logs = {"enable_access_log": args.access_log}
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=logs)  # the proxy's
        serve.run(app, name="dengine", route_prefix="/", blocking=False, logging_config=logs)  # the replicas'
        print(f"dengine: serving on http://{args.host}:{args.port}/v1 ({args.replicas} replica(s)); Ctrl-C or "
              "SIGTERM stops", flush=True)
        task = task_of_folder(resolve_model(args.model))
        if task is not None:
            print(f"dengine: {resolve_model(args.model).name} is an embedded model trained only on {task.name}: ask "
                  f"it questions like {task.example!r} (as a chat); other prompts get answers that mean nothing",
                  flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _drain(args.grace_period)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # drained or cut off: a further Ctrl-C must not cut the stop short
    if args.ray_address is None:
        ray.shutdown()  # the local Ray this command started, Serve with it (drained: nothing is in flight)
    else:
        try:
            serve.delete("dengine")  # this application only: the cluster and its other applications stay up
        except KeyboardInterrupt:
            print("dengine: interrupted again; the application may still be deleting", flush=True)
    print("dengine: stopped", flush=True)


ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


def quiet_ray_logs() -> None:
    """Keep Ray's console output to what an operator needs: no colour codes when the output is not a terminal
    (a log file); no warning that a new local cluster turned on token authentication (Ray's default, kept), and
    no "Connecting to existing Serve app" line, which `serve.run` logs after the `serve.start` this command
    makes itself."""
    for name, start in (("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
                        ("ray.serve", "Connecting to existing Serve app"),
                        ("ray.data", "Progress bars disabled")):  # run-batch draws its own
        logging.getLogger(name).addFilter(lambda record, start=start: not record.getMessage().startswith(start))
    # Ray colours more than its RAY_COLOR_PREFIX covers (the dashboard's address, "[repeated 2x across cluster]"
    # on deduplicated replica lines) and its driver writes to whatever sys.stdout / sys.stderr are at the time
    plain = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not stream.isatty() and not isinstance(stream, WithoutColour):
            plain[stream] = WithoutColour(stream)
            setattr(sys, name, plain[stream])
    # and its log handlers, made at `import ray`, keep the stream of that time
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for handler in (handler for logger in loggers for handler in logger.handlers):
        if isinstance(handler, logging.StreamHandler) and vars(handler).get("stream") in plain:  # (not one that
            handler.setStream(plain[handler.stream])  # looks sys.stderr up at each record: it has the wrapper)


class WithoutColour:
    """A text stream that drops terminal colour codes from what is written to it (a log file gets plain text)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(ANSI_CODE.sub("", text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _drain(grace_s: float) -> None:
    """New requests get 503; those in flight have grace_s seconds to finish (a second Ctrl-C cuts it short)."""
    from ray import serve

    print(f"dengine: stopping; new requests get 503, requests in flight have {grace_s:g} s to finish", flush=True)
    try:
        control = serve.get_deployment_handle("control", "dengine")  # tells every router
        left = control.drain.remote(grace_s).result(timeout_s=grace_s + 30)
    except KeyboardInterrupt:  # the second Ctrl-C: stop now, and let no further one cut the stop itself short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("dengine: interrupted again; requests still in flight are cut off", flush=True)
        return
    except Exception as exc:  # the application never started, or its router is gone: nothing to drain
        print(f"dengine: nothing to drain ({type(exc).__name__})", flush=True)
        return
    print("dengine: every request in flight finished" if not left else
          f"dengine: grace period over; {left} request(s) still in flight are cut off", flush=True)


def _run_batch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from pathlib import Path

    from dengine.serve.batch import run_batch

    quiet_ray_logs()
    try:
        defaults, engine_kwargs = check_engine_options(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if not Path(args.input).is_file():
            raise ValueError(f"--input {args.input}: no such file")
        summary = run_batch(Path(args.input), Path(args.output), args.model, args.replicas, engine_kwargs,
                            defaults=defaults, model_name=args.served_model_name, ray_address=args.ray_address,
                            num_cpus=args.num_cpus, num_gpus=args.num_gpus, batch_size=args.batch_size,
                            use_tqdm=not args.no_tqdm)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"dengine run-batch: {summary['written']} rows written to {args.output} ({summary['errors']} errors, "
          f"{summary['skipped']} answered before), {summary['rows_per_s']:.2f} rows/s")


def _memory(text: str) -> int | float:
    """--kv-cache-memory: an integer is bytes, anything else a fraction."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dengine", description="dengine: serving diffusion language models",
                                     formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    # demo, bench and explore hand every argument after their name to their own parser (its --help is theirs)
    commands.add_parser("demo", help="decode held-out problems on the embedded model (python -m dengine)",
                        add_help=False)

    serve = commands.add_parser("serve", help="the OpenAI-compatible API on Ray Serve",
                                description="The OpenAI-compatible API on Ray Serve. Every option is checked "
                                            "before Ray starts.", formatter_class=DefaultsHelpFormatter)
    add_engine_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--access-log", action="store_true",
                       help="log a line per request from the HTTP proxy and the replicas (Ray Serve's access log)")
    serve.add_argument("--grace-period", type=float, default=30.0,
                       help="seconds requests in flight get to finish on SIGTERM / Ctrl-C (default 30)")
    serve.add_argument("--routers", type=positive_int, default=2,
                       help="router replicas (the HTTP ingress; with two or more the service outlives one's death)")

    batch = commands.add_parser(
        "run-batch", help="an OpenAI batch file (JSONL requests in, JSONL results out), resumable",
        description="Answer an OpenAI batch input file offline, as the server would answer each request; results "
                    "are appended as they finish, and a rerun with the same output skips the custom_ids already "
                    "answered. One replica runs in this process; --replicas N (or --ray-address) runs N engines "
                    "through Ray Data.", formatter_class=DefaultsHelpFormatter)
    batch.add_argument("-i", "--input", required=True, help="the batch input file (JSONL)")
    batch.add_argument("-o", "--output", required=True, help="the results file (JSONL; appended to when resuming)")
    add_engine_options(batch)
    batch.add_argument("--batch-size", type=int, default=16, help="rows a Ray Data task hands an engine at once")
    batch.add_argument("--no-tqdm", action="store_true")

    bench = commands.add_parser(
        "bench", help="benchmarks: accuracy, policies, throughput (offline), serve (load on a server), drift, chaos "
                      "(a replica killed under load), width (step cost at the real models' width), headline (cache policies "
                      "with parallel decoding against vanilla on a long task), batch (run-batch rows/s)", add_help=False)
    bench.add_argument("which", nargs="?", choices=sorted(BENCHMARKS),
                       help="the benchmark; `dengine bench NAME --help` for its options")

    commands.add_parser("explore", help="write the trace explorer page with traces embedded", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command in ("serve", "run-batch"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "explore":
        from dengine.explore import main as explore_main

        explore_main(rest)
    elif args.command == "bench":
        import importlib

        if args.which is None:
            bench.print_help()
            raise SystemExit(0 if rest in ([], ["-h"], ["--help"]) else 2)

        importlib.import_module(BENCHMARKS[args.which]).main(rest)
    elif args.command == "demo":
        from dengine.__main__ import main as demo_main

        demo_main(rest)
    elif args.command == "serve":
        try:
            checked = _check_serve_options(args)
        except ValueError as exc:
            serve.error(str(exc))
        _serve(args, *checked)
    elif args.command == "run-batch":
        _run_batch(batch, args)


if __name__ == "__main__":
    main()
