"""Chaos soak: sustained load on a Serve deployment while clients walk away and a fault strikes.

    python -m dengine.bench.chaos --model llada-sudoku --replicas 2 --concurrency 12 --num-requests 300
    dengine bench chaos --dtype float32 --block-length 8 --out docs/bench/chaos
    dengine bench chaos --fault router --client-retries 2 --dtype float32 --block-length 8
    dengine bench chaos --fault oom --client-retries 2 --dtype float32 --block-length 8
    dengine bench chaos --fault slow --slow-clients 10000 --dtype float32 --block-length 8

Starts a local Ray and the dengine application (`--routers` routers + `--replicas` engine replicas) on
loopback, then keeps `--concurrency` clients busy with chat requests for held-out task problems (half
streamed, every one with its own seed). A fraction `--disconnect` of the requests is abandoned by its client
on purpose (a stream after its first event, a whole request after a short random wait); these are counted
apart. When `--kill-at` of the requests have been sent, the `--fault` strikes, beside the clients:
* `engine`: an engine replica killed (ray.kill); Serve starts a replacement.
* `router`: a router replica's process killed (SIGKILL), as the kernel's OOM killer or kill -9 would.
* `oom`: Ray's memory monitor does the killing. Ray starts with its memory threshold `--oom-headroom` GB above
  the machine's use; at the fault a process outside Ray takes memory (every page written) until the monitor
  kills a replica of its choosing, then frees it, as another job's passing spike would.
* `node`: Ray runs as a local two-node cluster (ray.cluster_utils: the head holds every engine but one, the
  worker node one, routers land on either); the worker node is removed with everything on it, and a new node
  joins `--node-return` seconds later, as an autoscaler would replace it.
* `slow`: `--slow-clients` connections each send a chat request's headers and 10 bytes of its 200-byte body,
  then nothing (the body timeout answers them 408); the load's latency before and after shows their effect.

A router's death loses the requests it held (their connections ran through it): the proxy answers a plain
request with a 500 and cuts a stream. `--client-retries N` makes the clients do what OpenAI's SDK does (two
retries by default): send a request again after a 5xx or a connection error, a stream too when it broke
before its first event; a stream cut later is sent again from the start (the same seed: the same answer),
which the SDK leaves to its caller. Retried requests are counted.

Reported: requests sent, completed, abandoned by their clients, **lost** (neither: an error, a cut stream or
an error event, after the client's retries), correct by the task's checker, equal to an offline run of the
same requests (same seeds; exact with --dtype float32), the routers' retries and resumed streams, the
clients' retries, the replicas that died, end-to-end p50 / p99 (all, and sent before / after the fault), how
the slow connections ended, the machine's used memory and the engine replicas' resident memory
at start and end, and each engine replica's KV blocks, running sequences and aborted requests once the load
is over (running and blocks 0 when nothing leaked).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from tqdm.auto import tqdm

from dengine.assets import resolve_model
from dengine.bench.report import QuietCheck, figure, plot_title, run_record, write_report
from dengine.bench.serve_load import percentiles
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.kv.kv_cache import available_memory_bytes, total_memory_bytes
from dengine.tasks import generation_lengths, get_task, task_of_model

CPU = torch.device("cpu")
FAULTS = ("engine", "router", "oom", "node", "slow")


@dataclass
class Outcome:
    status: str  # "ok", "abandoned" (by the client, on purpose) or "lost"
    text: str = ""
    latency_s: float = 0.0
    error: str | None = None
    sent_s: float = 0.0  # when it was sent, from the start of the load
    retryable: bool = False  # lost to a 5xx, 408, 409, 429, a broken connection or a cut stream (what clients retry)
    retries: int = 0  # times the client sent it again


ACTOR_TITLES = re.compile(rb"ray::(ServeController|ProxyActor)|ServeReplica:dengine:(\w+)")
ROLES = {b"ServeController": "controller", b"ProxyActor": "proxy", b"dengine": "router"}


def serve_replicas() -> dict[int, str]:
    """pid -> role ("engine", "router", "control", "controller", "proxy") of every Serve actor process of the
    dengine application on this machine (every node of a local cluster included)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                match = ACTOR_TITLES.search(f.read())
        except OSError:
            continue
        if match:
            name = match.group(1) or match.group(2)
            found[int(pid)] = ROLES.get(name, name.decode())
    return found


def _machine_used_bytes() -> int:
    return total_memory_bytes(CPU) - available_memory_bytes(CPU)


def memory_snapshot() -> dict[str, float]:
    """GB used on the machine (MemTotal - MemAvailable) and the engine replicas' resident memory."""
    replicas = []
    for pid, deployment in serve_replicas().items():
        if deployment != "engine":
            continue
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        replicas.append(rss / 1e9)
    return {"machine_used_gb": _machine_used_bytes() / 1e9, "replica_rss_gb": sorted(replicas)}


REPLICA_ROLES = ("engine", "router", "control")


def wait_vanished(before: dict[int, str], timeout: float, roles: tuple[str, ...] | None = None) -> list[str]:
    """The roles of the processes in `before` that are gone, waiting up to timeout for the first of `roles`."""
    deadline = time.monotonic() + timeout
    while True:
        now = serve_replicas()
        gone = sorted(name for pid, name in before.items() if pid not in now)
        if any(roles is None or name in roles for name in gone) or time.monotonic() > deadline:
            return gone
        time.sleep(0.05)


HOG_STEP = 16 << 20  # every 20 ms: 0.8 GB/s, a few steps between two looks of Ray's monitor (every 250 ms)


def _hog(limit: int, stop) -> None:
    """Another job's memory: take it HOG_STEP at a time (every page written) up to limit bytes; free it on stop."""
    held = []
    while not stop.is_set() and len(held) * HOG_STEP < limit:
        chunk = bytearray(HOG_STEP)
        chunk[::4096] = b"\1" * (HOG_STEP // 4096)
        held.append(chunk)
        time.sleep(0.02)
    stop.wait(300)


def memory_hog_until_a_kill(threshold_bytes: int, overshoot: int = 256 << 20, timeout: float = 120.0) -> list[str]:
    """A process outside Ray takes memory until the machine is `overshoot` past Ray's memory-monitor threshold
    (at most), and frees it as soon as the monitor has killed a replica (a job's passing spike; Serve's controller
    may die first: Ray's policy by owner group picks it, as it restarts). Returns the roles of the actors that
    died."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    before = serve_replicas()
    hog = context.Process(target=_hog, args=(max(0, threshold_bytes + overshoot - _machine_used_bytes()), stop),
                          daemon=True)
    hog.start()
    try:
        return wait_vanished(before, timeout, REPLICA_ROLES)
    finally:
        stop.set()
        hog.join(30)


async def slow_connections(host: str, port: int, count: int, hold_s: float, body_bytes: int = 200,
                           sent_bytes: int = 10) -> dict:
    """`count` connections that each send a chat request's headers and the first sent_bytes of a body_bytes body,
    then nothing, and wait up to hold_s for an answer. Returns how they ended: by the answer's status code,
    "closed" (no answer), "waiting" (none within hold_s), "refused" (could not connect); with the seconds from
    sending to the answer."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_bytes}\r\n\r\n").encode() + b'{"messages"'[:sent_bytes]
    connecting = asyncio.Semaphore(256)  # connects in flight: within the listen backlog
    ended: collections.Counter[str] = collections.Counter()
    answered_s: list[float] = []

    async def one() -> None:
        try:
            async with connecting:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        except (OSError, asyncio.TimeoutError):
            ended["refused"] += 1
            return
        start = time.perf_counter()
        try:
            writer.write(head)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), hold_s)
            how = line.split()[1].decode() if line.startswith(b"HTTP/") else "closed"
            answered_s.append(time.perf_counter() - start)
        except asyncio.TimeoutError:
            how = "waiting"
        except OSError:
            how = "closed"
        finally:
            writer.close()
        ended[how] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return {"count": count, "ended": dict(ended), "answered_s": percentiles(answered_s)}


async def one_request(client: httpx.AsyncClient, url: str, body: dict, abandon: float | None) -> Outcome:
    """Send one chat request; `abandon` (seconds) makes the client walk away (a stream: after its first event)."""
    start = time.perf_counter()
    try:
        if not body["stream"]:
            try:
                response = await asyncio.wait_for(client.post(f"{url}/v1/chat/completions", json=body), abandon)
            except asyncio.TimeoutError:
                return Outcome("abandoned")
            if response.status_code != 200:
                return Outcome("lost", error=f"HTTP {response.status_code}: {response.text[:200]}",
                               retryable=_retryable(response.status_code))
            return Outcome("ok", response.json()["choices"][0]["message"]["content"], time.perf_counter() - start)
        text, done = [], False
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome("lost", error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}",
                               retryable=_retryable(response.status_code))
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return Outcome("lost", error=f"error event: {event['error']}")
                if abandon is not None:
                    return Outcome("abandoned")
                text.extend(c["delta"].get("content") or "" for c in event["choices"])
        if not done:
            return Outcome("lost", error="the stream ended without [DONE]", retryable=True)
        return Outcome("ok", "".join(text), time.perf_counter() - start)
    except httpx.HTTPError as exc:  # a broken connection: a stream cut by its router's death among them
        return Outcome("lost", error=f"{type(exc).__name__}: {exc}", retryable=True)
    except (json.JSONDecodeError, KeyError) as exc:
        return Outcome("lost", error=f"{type(exc).__name__}: {exc}")


def _retryable(status: int) -> bool:
    """What OpenAI's Python client sends again: 408, 409, 429 and every 5xx."""
    return status in (408, 409, 429) or status >= 500


async def request_with_retries(client: httpx.AsyncClient, url: str, body: dict, abandon: float | None,
                               retries: int) -> Outcome:
    """one_request, sent again (from the start, with its seed) up to `retries` times while it fails retryably."""
    for attempt in range(retries + 1):
        outcome = await one_request(client, url, body, abandon)
        if outcome.status != "lost" or not outcome.retryable or attempt == retries:
            outcome.retries = attempt
            return outcome
        await asyncio.sleep(0.5 * 2 ** attempt)  # the SDK's backoff starts at 0.5 s
    raise AssertionError("unreachable")


async def run_load(url: str, bodies: list[dict], concurrency: int, disconnect: float, kill_after: int, seed: int,
                   kill, use_tqdm: bool, retries: int = 0) -> tuple[list[Outcome | None], float | None]:
    """Closed loop: `concurrency` clients; `kill()` once kill_after requests have been sent."""
    rng = random.Random(seed)
    abandon = [rng.uniform(0.05, 1.0) if rng.random() < disconnect else None for _ in bodies]
    outcomes: list[Outcome | None] = [None] * len(bodies)
    queue = list(range(len(bodies)))[::-1]
    killed_at = None
    striking: list[asyncio.Task] = []
    start = time.perf_counter()
    bar = tqdm(total=len(bodies), desc="chaos", unit="req", disable=not use_tqdm, dynamic_ncols=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as client:
        async def client_loop() -> None:
            nonlocal killed_at
            while queue:
                index = queue.pop()
                if index == kill_after and killed_at is None:
                    killed_at = time.perf_counter() - start
                    striking.append(asyncio.create_task(asyncio.to_thread(kill)))  # beside the clients
                sent = time.perf_counter() - start
                outcomes[index] = await request_with_retries(client, url, bodies[index], abandon[index], retries)
                outcomes[index].sent_s = sent
                if not outcomes[index].latency_s:  # abandoned or lost: until the client gave up or the error came
                    outcomes[index].latency_s = time.perf_counter() - start - sent
                bar.update(1)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        await asyncio.gather(*striking)
    bar.close()
    return outcomes, killed_at


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_states(url: str, replicas: int, timeout: float = 300.0) -> dict[str, dict]:
    """Each engine replica's /health engine stats (GETs land on any replica; ask until every one answered)."""
    seen: dict[str, dict] = {}
    deadline = time.time() + timeout
    while len(seen) < replicas and time.time() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=10)
            if response.status_code == 200:
                body = response.json()
                seen[body["replica"]] = body["engine"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return seen


def _wait_running(replicas: int, routers: int, timeout: float = 300.0) -> None:
    from ray import serve

    want = {"engine": replicas, "dengine": routers, "control": 1}
    deadline = time.time() + timeout
    while time.time() < deadline:
        app = serve.status().applications.get("dengine")
        if app is not None and set(want) <= set(app.deployments):
            if all(app.deployments[name].replica_states == {"RUNNING": n} for name, n in want.items()):
                return
        time.sleep(0.5)
    raise TimeoutError("the application did not come up")


def _p50_p99(latencies_ms: dict) -> str:
    return f"{latencies_ms.get('p50', 0):.0f} / {latencies_ms.get('p99', 0):.0f} ms"


def table(result: dict) -> str:
    rows = [("requests sent", result["sent"]), ("completed", result["completed"]),
            ("abandoned by their clients", result["abandoned"]), ("**lost**", f"**{result['lost']}**"),
            ("correct (task checker)", f"{result['correct']} / {result['completed']}"),
            ("equal to the offline run", f"{result['equal_offline']} / {result['completed']}"),
            ("routers' retries / resumed streams", f"{result['router']['retries']} / "
                                                   f"{result['router']['resumed_streams']}"),
            ("clients' retries (requests / times)", f"{result['client_retried']} / {result['client_retries']}"),
            (f"fault ({result['fault']}) struck after", f"{result['killed_after_s']:.1f} s"),
            ("Serve actors that died (the first after)", (", ".join(result["victims"]) or "none")
             + (f" ({result['first_death_s']:.1f} s)" if result.get("first_death_s") is not None else "")),
            ("end-to-end p50 / p99", _p50_p99(result["e2e_ms"])),
            ("end-to-end p50 / p99, sent before / after the fault",
             f"{_p50_p99(result['e2e_ms_before'])} / {_p50_p99(result['e2e_ms_after'])}"),
            ("machine memory used, start / end", f"{result['memory_start']['machine_used_gb']:.2f} / "
                                                 f"{result['memory_end']['machine_used_gb']:.2f} GB"),
            ("engine replicas' RSS, start / end", f"{result['memory_start']['replica_rss_gb']} / "
                                                  f"{result['memory_end']['replica_rss_gb']} GB"),
            ("after the load, per engine replica: running, KV blocks used, aborted requests",
             "; ".join(f"{s['running']}, {s['kv_blocks_used']}, {s.get('aborted_requests', 0)}"
                       for s in result["replicas_after"].values()))]
    if result["slow"]:
        slow = result["slow"]
        rows.append((f"{slow['count']} slow connections: how they ended (seconds to the answer, p50 / p99)",
                     ", ".join(f"{how}: {n}" for how, n in sorted(slow["ended"].items()))
                     + f" ({slow['answered_s'].get('p50', 0) / 1e3:.1f} / {slow['answered_s'].get('p99', 0) / 1e3:.1f} s)"))
    if result["memory_threshold_gb"] is not None:
        rows.append(("Ray's memory threshold", f"{result['memory_threshold_gb']:.2f} GB"))
    lines = ["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    if result["errors"]:
        lines.append("\nerrors: " + "; ".join(result["errors"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dengine bench chaos", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or embedded model (default llada-sudoku)")
    parser.add_argument("--replicas", type=positive_int, default=2)
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per engine replica")
    parser.add_argument("--concurrency", type=positive_int, default=12)
    parser.add_argument("--num-requests", type=positive_int, default=300)
    parser.add_argument("--disconnect", type=float, default=0.1, help="fraction of requests abandoned by clients")
    parser.add_argument("--routers", type=positive_int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.4, help="the fault strikes after this fraction was sent")
    parser.add_argument("--fault", choices=FAULTS, default="engine",
                        help="what strikes: an engine replica killed (ray.kill); a router's process killed (SIGKILL); "
                             "memory taken by another process until Ray's memory monitor kills a replica (oom); the "
                             "worker node of a local two-node cluster removed, a new node added --node-return s later "
                             "(node); --slow-clients connections that send half a request, then nothing (slow)")
    parser.add_argument("--oom-headroom", type=float, default=6.0,
                        help="oom: Ray's memory threshold is set this many GB above the machine's use at start")
    parser.add_argument("--node-return", type=float, default=10.0, help="node: seconds until a new node joins")
    parser.add_argument("--slow-clients", type=positive_int, default=10_000,
                        help="slow: connections that send a request's headers and 10 bytes of its body, then wait")
    parser.add_argument("--client-retries", type=int, default=0,
                        help="times a client sends a request again after a 5xx or a broken connection (OpenAI's "
                             "SDK: 2)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cache-policy", default="entropy")
    parser.add_argument("--gen-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--block-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--task", default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true", help="each request's latency against when it was sent")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    if args.fault in ("engine", "node") and args.replicas < 2:
        parser.error(f"--replicas must be at least 2 for --fault {args.fault}: one is lost")
    if args.fault == "router" and args.routers < 2:
        parser.error("--routers must be at least 2: one is killed")
    if args.client_retries < 0:
        parser.error("--client-retries must be at least 0")
    import ray
    from ray import serve

    from dengine import LLM, SamplingParams
    from dengine.serve.deployment import build_app, ray_serving_environment
    from dengine.serve.proxy import BODY_TIMEOUT_S

    folder = resolve_model(args.model)
    task = get_task(args.task) if args.task else task_of_model(folder)
    gen_length, block_length = generation_lengths(task, args.gen_length, args.block_length)
    problems = task.held_out(args.num_requests)
    rng = random.Random(args.seed)
    bodies = [{"messages": [{"role": "user", "content": p.question}], "max_tokens": gen_length,
               "block_length": block_length, "seed": rng.randrange(1 << 31), "stream": rng.random() < 0.5}
              for p in problems]
    check = QuietCheck()

    ray_serving_environment()  # as `dengine serve` starts Ray
    threshold = None
    if args.fault == "oom":  # Ray reads it when its raylet starts
        threshold = _machine_used_bytes() + int(args.oom_headroom * 1e9)
        os.environ["RAY_memory_usage_threshold"] = f"{threshold / total_memory_bytes(CPU):.4f}"
    cluster = node = None
    if args.fault == "node":
        from ray.cluster_utils import Cluster

        # every engine but one on the head node, one on the worker node (the engines' CPUs decide where they go)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": (args.replicas - 1) * args.num_cpus})
        node = cluster.add_node(num_cpus=args.num_cpus)
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(2, int(args.replicas * args.num_cpus)), include_dashboard=False, log_to_driver=False)
    slow: dict = {}
    first_death: list[float] = []  # s from the load's start (a memory hog and a node removal take seconds)
    try:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(folder), replicas=args.replicas, routers=args.routers, num_cpus=args.num_cpus,
                            dtype=args.dtype,
                            cache_policy=args.cache_policy,
                            defaults={"gen_length": gen_length, "block_length": block_length}),
                  name="dengine", route_prefix="/", blocking=False)
        _wait_running(args.replicas, args.routers)
        memory_start = memory_snapshot()
        if threshold is not None and _machine_used_bytes() > threshold - (1 << 30):
            raise SystemExit(f"the application already uses the memory up to Ray's threshold "
                             f"({threshold / 1e9:.1f} GB): raise --oom-headroom")

        control = serve.get_deployment_handle("control", "dengine")

        def kill() -> None:
            if args.fault == "slow":
                slow.update(asyncio.run(slow_connections("127.0.0.1", port, args.slow_clients,
                                                         hold_s=BODY_TIMEOUT_S + 30)))
                return
            before = serve_replicas()
            if args.fault == "oom":
                memory_hog_until_a_kill(threshold)
            elif args.fault == "node":
                cluster.remove_node(node)
            elif args.fault == "router":  # the process, as the OOM killer or kill -9 would
                os.kill(next(iter(control.routers.remote().result().values()))["pid"], signal.SIGKILL)
            else:
                victim = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                              if a["name"].startswith("SERVE_REPLICA::dengine#engine#"))
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            wait_vanished(before, 30)
            first_death.append(time.perf_counter() - started)
            if args.fault == "node":
                time.sleep(args.node_return)
                # a Ray node starts in the main thread only (it sets signal handlers): the clients' event loop
                # runs there, so the clients pause while the new node starts
                joined = concurrent.futures.Future()
                loops[0].call_soon_threadsafe(lambda: joined.set_result(cluster.add_node(num_cpus=args.num_cpus)))
                joined.result()

        loops: list[asyncio.AbstractEventLoop] = []

        async def load() -> tuple[list[Outcome | None], float | None]:
            loops.append(asyncio.get_running_loop())
            return await run_load(url, bodies, args.concurrency, args.disconnect, int(args.kill_at * len(bodies)),
                                  args.seed, kill, not args.no_tqdm, args.client_retries)

        alive = serve_replicas()
        started = time.perf_counter()
        outcomes, killed_at = asyncio.run(load())
        duration = time.perf_counter() - started
        _wait_running(args.replicas, args.routers)
        now = serve_replicas()
        victims = sorted(role for pid, role in alive.items() if pid not in now)  # every death of the run
        replicas_after = _replica_states(url, args.replicas)
        memory_end = memory_snapshot()
        time.sleep(1)  # the restarted router's first report
        router = control.stats.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

    done = [i for i, o in enumerate(outcomes) if o.status == "ok"]
    llm = LLM(folder, dtype=args.dtype, cache_policy=args.cache_policy)
    offline = llm.chat([bodies[i]["messages"] for i in done],
                       [SamplingParams(gen_length=gen_length, block_length=block_length, seed=bodies[i]["seed"])
                        for i in done], use_tqdm=False)
    result = {
        "sent": len(outcomes), "completed": len(done), "abandoned": sum(o.status == "abandoned" for o in outcomes),
        "lost": sum(o.status == "lost" for o in outcomes),
        "correct": sum(problems[i].check(outcomes[i].text) for i in done),
        "equal_offline": sum(outcomes[i].text == o.text for i, o in zip(done, offline)),
        "offline_correct": sum(problems[i].check(o.text) for i, o in zip(done, offline)),
        "router": router, "killed_after_s": killed_at, "duration_s": duration, "fault": args.fault,
        "victims": victims, "first_death_s": first_death[0] if first_death else None, "slow": slow,
        "memory_threshold_gb": None if threshold is None else threshold / 1e9,
        "e2e_ms_before": percentiles([o.latency_s for o in outcomes if o.status == "ok" and o.sent_s < killed_at]),
        "e2e_ms_after": percentiles([o.latency_s for o in outcomes if o.status == "ok" and o.sent_s >= killed_at]),
        "client_retried": sum(o.retries > 0 for o in outcomes), "client_retries": sum(o.retries for o in outcomes),
        "e2e_ms": percentiles([outcomes[i].latency_s for i in done]),
        "memory_start": memory_start, "memory_end": memory_end, "replicas_after": replicas_after,
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }
    markdown = table(result)
    print(markdown)
    record = run_record("python -m dengine.bench.chaos", argv, check, model=folder.name, task=task.name,
                        gen_length=gen_length, block_length=block_length, result=result)
    what = f"{folder.name}, {args.replicas} engines, {args.routers} routers, fault {args.fault}: every request's latency"
    write_report(args.out, record, markdown,
                 (lambda path: plot(outcomes, killed_at, path, plot_title(record, what))) if args.plot else None)
    return record


def plot(outcomes: list[Outcome], killed_at: float | None, path: Path, title: str) -> None:
    """Latency against send time, one colour per outcome, the kill marked."""
    with figure(path, title, figsize=(8, 4.5)) as (_fig, ax):
        for status, colour in (("ok", "tab:green"), ("abandoned", "tab:grey"), ("lost", "tab:red")):
            chosen = [o for o in outcomes if o.status == status]
            if chosen:
                ax.scatter([o.sent_s for o in chosen], [o.latency_s for o in chosen], s=8, color=colour,
                           label=f"{status} ({len(chosen)})")
        if killed_at is not None:
            ax.axvline(killed_at, color="black", linestyle="--", linewidth=1, label="fault")
        ax.set_xlabel("sent at (s from the start)")
        ax.set_ylabel("latency (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
