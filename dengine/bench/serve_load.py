"""Load on a running dengine server: Poisson arrivals or a closed loop, latency percentiles, saturation.

    dengine serve --model llada-reverse --port 8000 &
    python -m dengine.bench.serve_load --url http://127.0.0.1:8000 --rate 2 --num-requests 100
    python -m dengine.bench.serve_load --concurrency 8 --num-requests 64
    python -m dengine.bench.serve_load --sweep-concurrency 1 2 4 8 16 --out docs/bench/serve --plot
    python -m dengine.bench.serve_load --sweep-rates 0.5 1 2 4 --out docs/bench/serve-rates --plot

Every request is a streamed chat completion of a held-out task problem, so one SSE event arrives per
decoded block: time to first block (first event with text), inter-block latency (gaps between such events)
and end-to-end latency are measured per request, reported at p50 / p90 / p99 with completed / failed counts
and aggregate output tokens/s (completion tokens from the usage record). A run is bounded by
--num-requests and --max-seconds. Loopback servers only: this is a benchmark, not a load generator for
other people's machines.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from tqdm.auto import tqdm

from dengine.bench.report import QuietCheck, figure, plot_title, run_record, write_report
from dengine.assets import EMBEDDED_MODELS
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.tasks import get_task, task_of_model


@dataclass
class RequestRecord:
    ok: bool
    start: float
    end: float
    first_block: float | None = None
    block_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    mode: str  # "rate" or "concurrency"
    load: float  # requests/s, or concurrent clients
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_tokens_per_s: float
    ttfb_ms: dict[str, float]  # time to first block
    inter_block_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 (nearest rank) and the mean, in milliseconds; empty when nothing was measured."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return 1e3 * ordered[min(len(ordered), max(1, math.ceil(q * len(ordered) - 1e-9))) - 1]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "mean": 1e3 * sum(ordered) / len(ordered)}


def server_root(url: str) -> str:
    """The server's root from what a user passes: with or without a trailing slash or the /v1 an OpenAI
    client's base_url carries."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host is None:
        raise ValueError(f"{url!r} has no host")
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{url!r} is not a loopback address; this benchmark only loads local servers")


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    record = RequestRecord(ok=False, start=time.perf_counter(), end=0.0)
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if event.get("usage"):
                    record.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        record.first_block = record.first_block or now
                        record.block_times.append(now)
        record.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.end = time.perf_counter()
    return record


def summarize(mode: str, load: float, records: list[RequestRecord], duration: float) -> LoadResult:
    done = [r for r in records if r.ok]
    gaps = [b - a for r in done for a, b in zip(r.block_times, r.block_times[1:])]
    return LoadResult(
        mode=mode, load=load, completed=len(done), failed=len(records) - len(done), duration_s=duration,
        request_throughput=len(done) / duration, output_tokens_per_s=sum(r.completion_tokens for r in done) / duration,
        ttfb_ms=percentiles([r.first_block - r.start for r in done if r.first_block is not None]),
        inter_block_ms=percentiles(gaps), e2e_ms=percentiles([r.end - r.start for r in done]),
        errors=sorted({r.error for r in records if r.error})[:5],
    )


async def run_load(url: str, bodies: list[dict], mode: str, load: float, max_seconds: float, seed: int,
                   use_tqdm: bool) -> LoadResult:
    """Poisson arrivals at `load` requests/s, or `load` clients each sending its next request at once."""
    records: list[RequestRecord] = []
    bar = tqdm(total=len(bodies), desc=f"{mode} {load:g}", unit="req", disable=not use_tqdm, dynamic_ncols=True)
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=max(1, int(load)) if mode == "concurrency" else None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds), limits=limits) as client:
        async def send(body: dict) -> None:
            records.append(await one_request(client, url, body))
            bar.update(1)

        start = time.perf_counter()
        if mode == "rate":
            rng, tasks = random.Random(seed), []
            for body in bodies:
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.create_task(send(body)))
                await asyncio.sleep(rng.expovariate(load))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(1.0, deadline - time.perf_counter()) + 60)
        else:
            queue = list(reversed(bodies))

            async def client_loop() -> None:
                while queue and time.perf_counter() < deadline:
                    await send(queue.pop())

            await asyncio.gather(*(client_loop() for _ in range(int(load))))
        duration = time.perf_counter() - start
    bar.close()
    return summarize(mode, load, records, duration)


def knee(results: list[LoadResult]) -> LoadResult | None:
    """The saturation knee: the lightest load reaching 90% of the best output throughput of the sweep."""
    if not results:
        return None
    best = max(r.output_tokens_per_s for r in results)
    return next(r for r in results if r.output_tokens_per_s >= 0.9 * best)


def table(results: list[LoadResult]) -> str:
    lines = ["| mode | load | completed | failed | req/s | output tokens/s | first block p50/p90/p99 ms | "
             "inter-block p50/p90/p99 ms | end-to-end p50/p90/p99 ms |", "|" + "---|" * 9]

    def trio(d: dict[str, float]) -> str:
        return "/".join(f"{d[k]:.0f}" for k in ("p50", "p90", "p99")) if d else "-"

    for r in results:
        lines.append(f"| {r.mode} | {r.load:g} | {r.completed} | {r.failed} | {r.request_throughput:.2f} | "
                     f"{r.output_tokens_per_s:.1f} | {trio(r.ttfb_ms)} | {trio(r.inter_block_ms)} | {trio(r.e2e_ms)} |")
    return "\n".join(lines)


def plot(results: list[LoadResult], path: Path, title: str | None = None) -> None:
    loads = [r.load for r in results]
    with figure(path, title, ncols=2, figsize=(10, 4)) as (_, (left, right)):
        left.plot(loads, [r.output_tokens_per_s for r in results], marker="o")
        left.set_ylabel("output tokens/s")
        for q in ("p50", "p90", "p99"):
            right.plot(loads, [r.e2e_ms.get(q, float("nan")) for r in results], marker="o", label=f"end-to-end {q}")
        right.plot(loads, [r.ttfb_ms.get("p50", float("nan")) for r in results], marker="x", linestyle="--",
                   label="first block p50")
        right.set_ylabel("latency (ms)")
        right.legend(fontsize=7)
        xlabel = "request rate (req/s)" if results[0].mode == "rate" else "concurrent clients"
        for ax in (left, right):
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dengine bench serve", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (its /v1 base URL works too)")
    parser.add_argument("--model", default=None, help="the served model name (default: the server's only model)")
    loads = parser.add_mutually_exclusive_group()
    loads.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    loads.add_argument("--concurrency", type=positive_int, help="closed loop: this many clients")
    loads.add_argument("--sweep-rates", type=float, nargs="+")
    loads.add_argument("--sweep-concurrency", type=positive_int, nargs="+")
    parser.add_argument("--num-requests", type=positive_int, default=64, help="per load point")
    parser.add_argument("--max-seconds", type=float, default=300, help="per load point")
    parser.add_argument("--max-tokens", type=int, default=None, help="the generation length (default: the task's)")
    parser.add_argument("--task", default=None,
                        help="the questions asked (default: the served embedded model's task, else digit-reversal)")
    parser.add_argument("--extra", default=None, help='JSON merged into every body, e.g. \'{"threshold": 0.9}\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    url = server_root(args.url)
    check_loopback(url)
    try:
        served = httpx.get(f"{url}/v1/models", timeout=30)
        served.raise_for_status()
        model = args.model or served.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        parser.error(f"no dengine server answers at {url}/v1/models ({type(exc).__name__}: {exc}); "
                     "start one with `dengine serve` or pass --url")
    if args.task:
        task = get_task(args.task)
    else:
        task = task_of_model(EMBEDDED_MODELS[model]) if model in EMBEDDED_MODELS else get_task("digit-reversal")
    problems = task.held_out(args.num_requests)
    extra = json.loads(args.extra) if args.extra else {}
    max_tokens = args.max_tokens or task.gen_length
    bodies = [{"model": model, "messages": [{"role": "user", "content": p.question}], "max_tokens": max_tokens,
               "stream": True, "stream_options": {"include_usage": True}, **extra} for p in problems]
    if args.sweep_rates or args.rate:
        points = [("rate", r) for r in (args.sweep_rates or [args.rate])]
    else:
        points = [("concurrency", c) for c in (args.sweep_concurrency or [args.concurrency or 1])]
    if any(load <= 0 for _, load in points):
        parser.error("rates and concurrencies must be positive")
    check = QuietCheck()
    results = [asyncio.run(run_load(url, bodies, mode, load, args.max_seconds, args.seed, not args.no_tqdm))
               for mode, load in points]
    markdown = table(results)
    saturation = knee(results) if len(results) > 1 else None
    if saturation is not None:
        markdown += (f"\n\nsaturation knee: {saturation.mode} {saturation.load:g} "
                     f"({saturation.output_tokens_per_s:.1f} output tokens/s, 90% of the sweep's best)")
    print(markdown)
    record = run_record("python -m dengine.bench.serve_load", argv, check, model=model, task=task.name,
                        results=[asdict(r) for r in results],
                        knee=None if saturation is None else asdict(saturation))
    what = f"{model} served at {url}: load against throughput and latency"
    write_report(args.out, record, markdown,
                 (lambda path: plot(results, path, plot_title(record, what))) if args.plot else None)
    return record


if __name__ == "__main__":
    main()
