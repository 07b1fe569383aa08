"""`python -m dengine`: the main job on an embedded model.

By default the long task on `llada-chain`: 12 chains of 12 dependent sudokus (239-token answers in 8 blocks),
where a stale cache is visibly wrong and the cache saves most (about 80 s on 2 cores); `--model llada-sudoku`
decodes 500 Sudoku puzzles instead. Decodes held-out problems of the model's task three ways on the same
problems: exact decoding ("none"),
EntropyCache at its defaults, and EntropyCache set too aggressively (never refreshing after step 0). Prints a
few answers of each, then accuracy and speed side by side: the accuracy-for-speed trade-off of the cache.
"""

from __future__ import annotations

import argparse
import json

import torch

from dengine.assets import resolve_model
from dengine.bench.accuracy import compare, markdown_table, model_task
from dengine.bench.policies import sampler_params
from dengine.bench.report import QuietCheck
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.llm import LLM
from dengine.models.layers import num_weights
from dengine.scheduler.policies.entropy import EntropyOptions

AGGRESSIVE = {"tau": 1e9, "k": 0}  # never refresh, never recompute committed tokens
MAIN_JOB_MODEL = "llada-chain"  # the long task: the trade-off at its clearest (docs/benchmarks.md 1c)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dengine", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default=MAIN_JOB_MODEL, help=f"embedded model name or checkpoint folder "
                                                                f"(default: {MAIN_JOB_MODEL})")
    parser.add_argument("--task", default=None, help="default: the task the model's folder names")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="held-out problems (default: the task's main_job_problems: 500 for sudoku4, 12 for "
                             "sudoku-chain)")
    parser.add_argument("--aggressive", default=json.dumps(AGGRESSIVE),
                        help="the too-aggressive EntropyCache options shown for contrast (JSON)")
    args = parser.parse_args(argv)
    task = model_task(args.model, args.task)
    args.n = args.n or task.main_job_problems
    check = QuietCheck()
    llm = LLM(args.model)
    config = llm.engine.config
    params = num_weights(llm.engine.model) / 1e6
    defaults = EntropyOptions().resolved()
    print(f"dengine main job: {args.model} ({config.model_type}-format, {params:.1f}M parameters, "
          f"{resolve_model(args.model)})\n"
          f"task {task.name}: {task.summary}; {args.n} held-out problems, one token per step, "
          f"gen_length {task.gen_length}, block_length {task.block_length}, {torch.get_num_threads()} CPU threads\n"
          f"answers: {task.answer_format}\n"
          f"policies: none (exact), entropy at its defaults (tau {defaults.tau}, k {defaults.k}), "
          f"entropy {args.aggressive} (too aggressive)\n", flush=True)
    problems = task.held_out(args.n)
    base = sampler_params(task.sampler, task.gen_length, task.block_length)
    runs = [("none", None), ("entropy", None), ("entropy", json.loads(args.aggressive))]
    results = compare(llm, problems, base, runs)
    names = ["exact", "EntropyCache", "too aggressive"]
    print()
    for i, sample in enumerate(results[0].samples):
        print(f"Q: {sample['question']}")
        for name, result in zip(names, results):
            got = result.samples[i]
            print(f"   {name:>15}: {got['got']}   ({'right' if got['correct'] == 'True' else 'wrong'})")
        print()
    print(markdown_table(results))
    exact, cached, aggressive = results
    print(f"\nEntropyCache: accuracy {cached.accuracy:.1%} against {exact.accuracy:.1%} exact, "
          f"{cached.speedup:.2f}x faster ({cached.avg_query_tokens:.1f} query tokens per forward instead of "
          f"{exact.avg_query_tokens:.1f}, a full recompute on {cached.full_recompute_rate:.0%} of steps); "
          f"never refreshing is {aggressive.speedup:.2f}x faster but only {aggressive.accuracy:.1%} accurate.")
    if check.finish()["warnings"]:
        print("The machine was not quiet during the run (warnings above): the speedups are not comparable; "
              "rerun on an idle machine.")


if __name__ == "__main__":
    main()
