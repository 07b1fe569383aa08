"""What the server adds to one request: a lone chat request through `dengine serve`'s application (Serve's
proxy, the router, an engine replica) against the same request offline (`LLM.chat`), alternated in one run.

    python benchmarks/server_overhead.py --model llada-reverse --threads 2 --rounds 7

Starts a local Ray and the application with one engine replica of --threads CPUs (torch threads alike),
waits until it answers, then alternates --rounds times: offline in this process (same threads), the
request non-streamed over HTTP, and streamed. Prints the medians and the server / offline ratios. Run it on
a quiet machine: the offline run and the replica share the cores, one at a time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import requests
import torch

from dengine import LLM, SamplingParams
from dengine.assets import resolve_model
from dengine.bench.report import QuietCheck, run_record, write_report
from dengine.tasks import generation_lengths, task_of_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-reverse")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cache-policy", default="entropy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    from dengine.serve.deployment import build_app

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    task = task_of_model(folder)
    gen_length, block_length = generation_lengths(task, None, None)
    messages = [{"role": "user", "content": task.held_out(1)[0].question}]
    llm = LLM(folder, dtype=args.dtype, cache_policy=args.cache_policy)
    params = SamplingParams(gen_length=gen_length, block_length=block_length, seed=1)
    check = QuietCheck()

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(folder), replicas=1, num_cpus=args.threads, dtype=args.dtype,
                            cache_policy=args.cache_policy,
                            defaults={"gen_length": gen_length, "block_length": block_length}),
                  name="dengine", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"messages": messages, "max_tokens": gen_length, "block_length": block_length, "seed": 1}
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.post(url, json=body, timeout=60).status_code == 200:  # also warms the replica
                    break
            except requests.RequestException:
                time.sleep(0.5)
        llm.chat(messages, params, use_tqdm=False)  # warm-up
        times: dict[str, list[float]] = {"offline": [], "server": [], "server, streamed": [],
                                          "server, the engine's own latency": []}
        texts = set()
        for _ in range(args.rounds):
            start = time.perf_counter()
            texts.add(llm.chat(messages, params, use_tqdm=False)[0].text)
            times["offline"].append(time.perf_counter() - start)
            start = time.perf_counter()
            response = requests.post(url, json=body, timeout=120)
            times["server"].append(time.perf_counter() - start)
            texts.add(response.json()["choices"][0]["message"]["content"])
            times["server, the engine's own latency"].append(response.json()["dengine"]["latency_s"])
            start = time.perf_counter()
            requests.post(url, json={**body, "stream": True}, timeout=120).content
            times["server, streamed"].append(time.perf_counter() - start)
    finally:
        serve.shutdown()
        ray.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = ["| path | median s | / offline |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {value / medians['offline']:.2f}x |" for name, value in medians.items()]
    markdown = "\n".join(lines) + f"\n\none answer on every path: {len(texts) == 1}"
    print(markdown)
    record = run_record("python benchmarks/server_overhead.py", argv, check, model=folder.name,
                        threads=args.threads, times=times, medians=medians, same_answer=len(texts) == 1)
    write_report(None if args.out is None else Path(args.out), record, markdown)
    return record


if __name__ == "__main__":
    main()
