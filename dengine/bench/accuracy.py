"""Accuracy harness: a model's held-out task problems through LLM.chat, accuracy next to speed, per policy.

    python -m dengine.bench.accuracy --model llada-sudoku --policies none entropy dual --n 500

The task and its decoding settings come from the model's folder (task.json); flags only override them.

Every policy runs the same problems with the same sampler in one process; speedup is wall time of the
first policy (the baseline, "none" by default) over the policy's. Prints a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dengine.assets import resolve_model
from dengine.bench.report import QuietCheck, run_record, write_report
from dengine.cli_args import DefaultsHelpFormatter, nonnegative_int, positive_int
from dengine.llm import LLM
from dengine.outputs import RequestOutput
from dengine.sampling_params import SamplingParams
from dengine.tasks import Problem, Task, generation_lengths, get_task, task_of_model


@dataclass
class PolicyResult:
    """One policy's run over the problems: accuracy and the speed metrics of methods.md section 7."""

    policy: str
    cache_config: dict[str, Any] | None
    n: int
    accuracy: float
    wall_s: float
    nfe: float  # forwards per request
    tokens_per_forward: float
    avg_query_tokens: float
    full_recompute_rate: float
    tokens_per_s: float  # committed generated tokens (all positions) per second
    answer_tokens_per_s: float  # generated tokens before the first EOS per second
    decision_share: float  # cache-policy decision time / wall time
    speedup: float = 1.0
    samples: list[dict[str, str]] = field(default_factory=list)


def answer_length(output: RequestOutput, eos: int) -> int:
    """Generated tokens before the first EOS (the papers' throughput numerator)."""
    return output.token_ids.index(eos) if eos in output.token_ids else len(output.token_ids)


def output_stats(outputs: list[RequestOutput], wall: float, eos: int) -> dict[str, float]:
    """The speed metrics of methods.md section 7 over finished requests that took wall seconds together."""
    forwards = sum(o.metrics.nfe for o in outputs)
    return {
        "nfe": forwards / len(outputs),
        "tokens_per_forward": sum(o.metrics.committed_tokens for o in outputs) / forwards,
        "query_tokens_per_forward": sum(o.metrics.query_tokens for o in outputs) / forwards,
        "full_recompute_rate": sum(o.metrics.full_recomputes for o in outputs) / forwards,
        "tokens_per_s": sum(len(o.token_ids) for o in outputs) / wall,
        "answer_tokens_per_s": sum(answer_length(o, eos) for o in outputs) / wall,
    }


def evaluate(llm: LLM, problems: list[Problem], params: SamplingParams, use_tqdm: bool = True,
             samples: int = 3) -> PolicyResult:
    """Run the problems as chats and score them; params carries the policy (cache_policy / cache_config)."""
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=use_tqdm)
    wall = time.perf_counter() - start
    correct = [p.check(o.text or "") for p, o in zip(problems, outputs)]
    stats = output_stats(outputs, wall, llm.engine.config.eos_token_id)
    return PolicyResult(
        policy=outputs[0].metrics.cache_policy,
        cache_config=params.cache_config,
        n=len(outputs),
        accuracy=sum(correct) / len(outputs),
        wall_s=wall,
        nfe=stats["nfe"],
        tokens_per_forward=stats["tokens_per_forward"],
        avg_query_tokens=stats["query_tokens_per_forward"],
        full_recompute_rate=stats["full_recompute_rate"],
        tokens_per_s=stats["tokens_per_s"],
        answer_tokens_per_s=stats["answer_tokens_per_s"],
        decision_share=sum(o.metrics.decision_seconds for o in outputs) / wall,
        samples=[
            {"question": p.question, "expected": p.answer, "got": o.text or "", "correct": str(ok)}
            for p, o, ok in list(zip(problems, outputs, correct))[:samples]
        ],
    )


def compare(llm: LLM, problems: list[Problem], base: SamplingParams,
            policies: list[tuple[str, dict[str, Any] | None]], use_tqdm: bool = True) -> list[PolicyResult]:
    """Each policy on the same problems and sampler; speedups against the first one. With use_tqdm, an overall
    bar counts the policies done above each run's own bar; without, a line on stderr as each policy ends (a
    log shows a long run moving)."""
    results = []
    overall = tqdm(total=len(policies), desc="policies", unit="run", disable=not use_tqdm or len(policies) < 2,
                   dynamic_ncols=True)
    with overall:
        for name, config in policies:
            results.append(evaluate(llm, problems, base.replace(cache_policy=name, cache_config=config), use_tqdm))
            overall.update(1)
            if not use_tqdm:
                done = results[-1]
                print(f"policy {len(results)}/{len(policies)} {name}{' ' + json.dumps(config) if config else ''}: "
                      f"{done.accuracy:.1%} of {done.n} in {done.wall_s:.0f} s", file=sys.stderr, flush=True)
    for result in results:
        result.speedup = results[0].wall_s / result.wall_s
    return results


COLUMNS = ("policy", "options", "accuracy", "NFE", "tokens/forward", "query tokens/forward", "full recompute",
           "tokens/s (all)", "tokens/s (before EOS)", "wall s", "speedup", "decision share")


def markdown_table(results: list[PolicyResult], leading: dict[str, list[str]] | None = None) -> str:
    """One row per result; leading adds columns (name -> one cell per result) before the policy."""
    leading = leading or {}
    names = [*leading, *COLUMNS]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for i, r in enumerate(results):
        cells = [cells_of[i] for cells_of in leading.values()] + [
            r.policy, json.dumps(r.cache_config) if r.cache_config else "", f"{r.accuracy:.1%}", f"{r.nfe:.1f}",
            f"{r.tokens_per_forward:.2f}", f"{r.avg_query_tokens:.1f}", f"{r.full_recompute_rate:.1%}",
            f"{r.tokens_per_s:.1f}", f"{r.answer_tokens_per_s:.1f}", f"{r.wall_s:.1f}", f"{r.speedup:.2f}x",
            f"{r.decision_share:.3%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_policy(spec: str) -> tuple[str, dict[str, Any] | None]:
    """'entropy' or 'entropy:{"tau": 0.5, "k": 8}'."""
    name, _, options = spec.partition(":")
    return name, json.loads(options) if options else None


def model_task(model: str | Path | None, task: str | None) -> Task:
    """The task named on the command line, else the one the model's folder names."""
    return get_task(task) if task else task_of_model(resolve_model(model))


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--task, --gen-length and --block-length: overrides of what the model's task.json implies."""
    parser.add_argument("--task", default=None, help="default: the task the model's folder names (task.json)")
    parser.add_argument("--gen-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--block-length", type=int, default=None, help="default: the task's")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dengine bench accuracy", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="llada-sudoku", help="embedded model name or checkpoint folder")
    parser.add_argument("--policies", nargs="+", default=["none", "entropy", "dual"],
                        help='policies in order, the first is the baseline; options as \'entropy:{"tau":0.5}\'')
    parser.add_argument("--n", type=positive_int, default=500, help="held-out problems")
    parser.add_argument("--skip", type=nonnegative_int, default=0,
                        help="start after the first SKIP held-out problems: a fresh set for a setting chosen on them "
                             "(the training streams exclude only the first 500)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="max_num_seqs (1 = one request at a time)")
    add_task_arguments(parser)
    parser.add_argument("--steps", type=int, default=None,
                        help="default: gen_length (LLaDA: one token per step; Dream's own schedule then commits "
                             "none on a block's first step and two on its last: --tokens-per-step 1 for one a step)")
    parser.add_argument("--tokens-per-step", type=positive_int, default=None,
                        help="commit exactly this many tokens a step instead of the family's schedule")
    parser.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding")
    parser.add_argument("--stop-at-eos", action="store_true", help="finish a request once its answer is fixed")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--json", type=Path, default=None, help="write only the JSON record here (older records' form)")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)

    task = model_task(args.model, args.task)
    gen_length, block_length = generation_lengths(task, args.gen_length, args.block_length)
    try:
        base = SamplingParams(gen_length=gen_length, block_length=block_length, steps=args.steps,
                              threshold=args.threshold, tokens_per_step=args.tokens_per_step,
                              stop_at_eos=args.stop_at_eos)
    except ValueError as error:
        parser.error(str(error))
    check = QuietCheck()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size)
    problems = task.held_out(args.skip + args.n)[args.skip:]
    results = compare(llm, problems, base, [parse_policy(p) for p in args.policies], not args.no_tqdm)
    markdown = markdown_table(results)
    record = run_record(
        "python -m dengine.bench.accuracy", argv, check, model=str(args.model), task=task.name,
        sampler={f: getattr(base, f) for f in ("gen_length", "block_length", "steps", "threshold", "tokens_per_step",
                                               "stop_at_eos")},
        batch_size=args.batch_size, skip=args.skip, results=[asdict(r) for r in results],
    )
    print(markdown)
    write_report(args.out, record, markdown)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
