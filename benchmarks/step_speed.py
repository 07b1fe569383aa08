"""Step time of this checkout against another one (a commit's worktree), alternating processes, medians.

    git worktree add /tmp/base 30de522
    python benchmarks/step_speed.py --base /tmp/base --threads 2 --rounds 5

Each round runs one process per checkout (PYTHONPATH pointing at it), base first, then this one: in each,
llada-reverse in bf16 on held-out digit-reversal problems (gen 128, block 32, one token per step) times
every engine step: one request at a time with policy none (the full step) and with EntropyCache at its
defaults (its partial steps, full recomputes left out), then 16 requests batched with none and with
EntropyCache (mean step). Prints each checkout's medians over the rounds and base / this: the speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
MEASURES = ["full_ms", "partial_ms", "full16_ms", "partial16_ms"]


def child(requests: int, cpu_time: bool, compile_: bool) -> dict[str, float]:
    """One process's measurements (imports dengine from PYTHONPATH)."""
    import torch

    from dengine.llm import LLM, chat_prompt
    from dengine.sampling_params import SamplingParams
    from dengine.tasks import get_task

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    clock = time.process_time if cpu_time else time.perf_counter
    llm = LLM("llada-reverse", dtype="bfloat16", kv_cache_memory=1 << 28, **({"compile": True} if compile_ else {}))
    engine = llm.engine
    problems = get_task("digit-reversal").held_out(16)
    prompts = [chat_prompt(llm.tokenizer, [{"role": "user", "content": p.question}]) for p in problems]

    def steps(policy: str, batch: list[dict]) -> list[tuple[float, bool]]:
        """(seconds, was a full recompute) of every engine step decoding batch together; seconds of the
        process's CPU time with --cpu-time (robust to other work on the machine), else wall time."""
        params = SamplingParams(gen_length=128, block_length=32, steps=128, cache_policy=policy)
        for i, prompt in enumerate(batch):
            engine.add_request(f"{policy}-{time.monotonic_ns()}-{i}", prompt, params)
        out = []
        while engine.has_unfinished_requests():
            seqs = list(engine.scheduler.running) + list(engine.scheduler.waiting)
            before = sum(s.metrics.full_recomputes for s in seqs)
            start = clock()
            engine.step()
            out.append((clock() - start, sum(s.metrics.full_recomputes for s in seqs) > before))
        return out

    steps("none", prompts[:1])  # warm up
    full = [t for i in range(requests) for t, _ in steps("none", prompts[i : i + 1])]
    partial = [t for i in range(requests) for t, f in steps("entropy", prompts[i : i + 1]) if not f]
    full16 = [t for t, _ in steps("none", prompts)]
    partial16 = [t for t, _ in steps("entropy", prompts)]
    return {"full_ms": 1e3 * statistics.median(full), "partial_ms": 1e3 * statistics.median(partial),
            "full16_ms": 1e3 * statistics.mean(full16), "partial16_ms": 1e3 * statistics.mean(partial16)}


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
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
            command = [sys.executable, __file__, "--child", "--base", str(tree), "--requests", str(args.requests)]
            command += ["--cpu-time"] * args.cpu_time + ["--compile"] * (args.compile and name == "this")
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    medians = {name: {m: statistics.median(r[m] for r in runs) for m in MEASURES} for name, runs in results.items()}
    clock = "CPU" if args.cpu_time else "wall"
    print(f"\n{args.threads} threads, {args.rounds} rounds, medians ({clock} ms per step) and base / this:")
    for m in MEASURES:
        print(f"  {m:>13}: base {medians['base'][m]:8.2f}  this {medians['this'][m]:8.2f}  "
              f"speedup {medians['base'][m] / medians['this'][m]:.2f}x")


if __name__ == "__main__":
    main()
