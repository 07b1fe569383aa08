"""Step time of this checkout against another one (a commit's worktree), alternating processes, medians.

    git worktree add /tmp/base 30de522
    python benchmarks/step_speed.py --base /tmp/base --threads 2 --rounds 5

Each round runs one process per checkout (PYTHONPATH pointing at it), base first, then this one: in each,
llada-reverse in bf16 on held-out digit-reversal problems (gen 128, block 32, one token per step) times
every engine step: one request at a time with policy none (the full step) and with EntropyCache at its
defaults (its partial steps, full recomputes left out), then 16 requests batched with none and with
EntropyCache (its partial steps). Each step is split into the model's forward (attention apart), the
batch's metadata (flattening, attention plan), the sampler, the cache policy's decisions, the scheduler and
the rest (Python between them). Prints the medians over the rounds of each process's mean per step, and
base / this: the speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# workload: (policy, requests decoded together); partial workloads keep only steps without a full recompute
WORKLOADS = {"full": ("none", 1), "partial": ("entropy", 1), "full16": ("none", 16), "partial16": ("entropy", 16)}
PARTS = ["total", "forward", "attention", "metadata", "sampler", "policy", "scheduler", "other"]


def child(requests: int, cpu_time: bool, compile_: bool) -> dict[str, dict[str, float]]:
    """One process's mean milliseconds per step, per workload: the step and its parts (imports dengine from
    PYTHONPATH; only functions both checkouts have are wrapped)."""
    import torch

    from dengine.decoding import Decoder
    from dengine.llm import LLM, chat_prompt
    from dengine.sampling_params import SamplingParams
    from dengine.tasks import get_task

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    clock = time.process_time if cpu_time else time.perf_counter
    llm = LLM("llada-reverse", dtype="bfloat16", kv_cache_memory=1 << 28, **({"compile": True} if compile_ else {}))
    engine = llm.engine
    problems = get_task("digit-reversal").held_out(16)
    prompts = [chat_prompt(llm.tokenizer, [{"role": "user", "content": p.question}]) for p in problems]
    spent: dict[str, float] = defaultdict(float)

    def timed(part, fn):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += clock() - start
        return wrapper

    scheduler, runner = engine.scheduler, engine.runner
    scheduler.schedule = timed("scheduler", scheduler.schedule)
    scheduler.postprocess = timed("scheduler", scheduler.postprocess)
    runner.prepare = timed("metadata", runner.prepare)  # flattening the batch, planning attention
    runner.model.forward = timed("forward", runner.model.forward)
    plan = runner.backend.plan
    runner.backend.plan = lambda batch: timed("attention", plan(batch))
    Decoder.step = timed("sampler", Decoder.step)

    def steps(policy: str, batch: list[dict]) -> list[dict[str, float]]:
        """Every engine step decoding batch together: seconds per part, and whether any sequence recomputed
        fully; CPU seconds of the process with --cpu-time (robust to other work on the machine), else wall."""
        params = SamplingParams(gen_length=128, block_length=32, steps=128, cache_policy=policy)
        for i, prompt in enumerate(batch):
            engine.add_request(f"{policy}-{time.monotonic_ns()}-{i}", prompt, params)
        for seq in scheduler.waiting:
            seq.policy.plan = timed("policy_plan", seq.policy.plan)  # called by the scheduler
            seq.policy.observe = timed("policy_observe", seq.policy.observe)  # called by the sequence
        out = []
        while engine.has_unfinished_requests():
            seqs = list(scheduler.running) + list(scheduler.waiting)
            before = sum(s.metrics.full_recomputes for s in seqs)
            spent.clear()
            start = clock()
            engine.step()
            total = clock() - start
            policy = spent["policy_plan"] + spent["policy_observe"]
            parts = {"total": total, "forward": spent["forward"] - spent["attention"],
                     "attention": spent["attention"], "metadata": spent["metadata"], "sampler": spent["sampler"],
                     "policy": policy, "scheduler": spent["scheduler"] - spent["policy_plan"]}
            parts["other"] = total - sum(v for part, v in parts.items() if part != "total")
            parts["full"] = sum(s.metrics.full_recomputes for s in seqs) > before
            out.append(parts)
        return out

    steps("none", prompts[:1])  # warm up
    result = {}
    for name, (policy, count) in WORKLOADS.items():
        runs = range(requests) if count == 1 else [0]
        kept = [s for i in runs for s in steps(policy, prompts[i : i + count]) if policy == "none" or not s["full"]]
        result[name] = {part: 1e3 * statistics.mean(s[part] for s in kept) for part in PARTS}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. a worktree of 30de522)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2, help="requests one at a time per policy and process")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps by the process's CPU time instead of wall time (on a shared machine)")
    parser.add_argument("--compile", action="store_true", help="this checkout with LLM(compile=True)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.requests, args.cpu_time, args.compile)))
        return
    trees = {"base": args.base.resolve(), "this": HERE}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
            command = [sys.executable, __file__, "--child", "--base", str(tree), "--requests", str(args.requests)]
            command += ["--cpu-time"] * args.cpu_time + ["--compile"] * (args.compile and name == "this")
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{w} {r['total']:.2f} ms"
                                                               for w, r in results[name][-1].items()), flush=True)
    medians = {name: {w: {part: statistics.median(r[w][part] for r in runs) for part in PARTS} for w in WORKLOADS}
               for name, runs in results.items()}
    clock = "CPU" if args.cpu_time else "wall"
    print(f"\n{args.threads} threads, {args.rounds} rounds; medians over rounds of the mean {clock} ms per step\n")
    print("| workload | checkout | " + " | ".join(PARTS) + " |\n|" + "---|" * (len(PARTS) + 2))
    for w in WORKLOADS:
        for name in trees:
            print(f"| {w} | {name} | " + " | ".join(f"{medians[name][w][part]:.2f}" for part in PARTS) + " |")
    print()
    for w in WORKLOADS:
        base, this = medians["base"][w]["total"], medians["this"][w]["total"]
        print(f"{w:>10}: base {base:8.2f} ms, this {this:8.2f} ms per step: {base / this:.2f}x faster")


if __name__ == "__main__":
    main()
