"""The headline: cache policies with parallel decoding against vanilla decoding, on a long task a cache can fail.

    dengine bench headline --model llada-chain --n 500 --width-record docs/bench/width-llada.json \\
        --out docs/bench/headline-llada-chain --plot

Vanilla is one token per step with a full recompute every step (policy "none"); every other run decodes
with the parallel sampler (threshold 0.9 by default), first without a cache, then with each policy. Per run:
accuracy on the model's held-out problems, forwards per request, rows (query positions) per forward, the
cost-side speedup (vanilla's rows x forwards over the run's), and the wall speedup here at --batch-size
(the same run) and at batch 1 (the first --wall-n problems, one request at a time). With --width-record (a
`dengine bench width` record at the family's real width) each run's schedule is priced at the full-size
model's step time for its rows per forward, which predicts the speedup of the 8B model on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from dengine.bench.accuracy import PolicyResult, add_task_arguments, evaluate, model_task, parse_policy
from dengine.bench.policies import sampler_params
from dengine.bench.report import QuietCheck, figure, plot_title, run_record, write_report
from dengine.bench.width import interpolate
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.llm import LLM
from dengine.tasks import generation_lengths

VANILLA = ("one-token", "none", None)
# EntropyCache at its defaults (for an answer of several blocks and a parallel sampler: no refresh after step 0,
# the suffix recomputed by entropy; docs/benchmarks.md 2c), the paper's rule spelled out, and the published caches
PUBLISHED = ["entropy", 'entropy:{"tau": 0.01, "k": 2, "signal": "max", "accumulate": false, "recent_steps": 0, '
             '"suffix": false, "suffix_tau": 0.0}',
             "prefix", "dual", "d2cache", "dllm"]


@dataclass
class HeadlineRow:
    label: str
    sampler: str
    result: PolicyResult  # at --batch-size, every problem
    batch1_wall_s: float | None  # the first --wall-n problems, one at a time
    cost: float = 0.0  # rows x forwards per request
    cost_speedup: float = 1.0
    wall_speedup: float = 1.0
    batch1_speedup: float | None = None
    predicted_s: float | None = None  # per request at the real width, from --width-record
    predicted_speedup: float | None = None


def label_of(policy: str, config: dict | None) -> str:
    return policy + (f" {json.dumps(config)}" if config else "")


def price(rows: list[HeadlineRow], width_record: dict | None) -> None:
    """Fill the speedups against rows[0] (vanilla) and, with a width record, the real-width prediction."""
    base = rows[0]
    table = None if width_record is None else {int(r): s for r, s in width_record["predicted_full_model"].items()}
    for row in rows:
        r = row.result
        row.cost = r.nfe * r.avg_query_tokens
        row.cost_speedup = base.result.nfe * base.result.avg_query_tokens / row.cost
        row.wall_speedup = base.result.wall_s / r.wall_s
        if row.batch1_wall_s and base.batch1_wall_s:
            row.batch1_speedup = base.batch1_wall_s / row.batch1_wall_s
        if table is not None:
            row.predicted_s = r.nfe * interpolate(table, r.avg_query_tokens)
    if table is not None:
        for row in rows:
            row.predicted_speedup = base.predicted_s / row.predicted_s


def markdown(rows: list[HeadlineRow], batch_size: int, wall_n: int, width_record: dict | None) -> str:
    predicted = width_record is not None
    head = ["run", "sampler", "accuracy", "forwards / request", "rows / forward", "full recompute",
            "rows x forwards", "cost-side speedup", f"wall speedup (batch {batch_size})",
            f"wall speedup (batch 1, {wall_n} problems)"]
    if predicted:
        head += ["predicted s / request (full size)", "predicted speedup (full size)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = row.result
        cells = [row.label, row.sampler, f"{r.accuracy:.1%}", f"{r.nfe:.1f}", f"{r.avg_query_tokens:.1f}",
                 f"{r.full_recompute_rate:.1%}", f"{row.cost:.0f}", f"**{row.cost_speedup:.1f}x**",
                 f"{row.wall_speedup:.2f}x", "" if row.batch1_speedup is None else f"{row.batch1_speedup:.2f}x"]
        if predicted:
            cells += [f"{row.predicted_s:.1f}", f"{row.predicted_speedup:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if predicted:
        lines += ["", f"Full-size prices: step times of `{width_record['command']}` (canvas {width_record['canvas']}, "
                      f"commit {width_record['commit']}, {width_record['date']}), linear in rows between its "
                      "measured row counts."]
    return "\n".join(lines)


def plot(rows: list[HeadlineRow], title: str, path: Path) -> None:
    """Accuracy against the cost-side speedup, one point per run."""
    with figure(path, title, figsize=(9, 4.8)) as (_, ax):
        for i, row in enumerate(rows):
            ax.scatter(row.cost_speedup, 100 * row.result.accuracy, s=60, marker="os^Dvx*P<>"[i % 10],
                       color=f"C{i % 10}", label="\n".join(textwrap.wrap(f"{row.label} ({row.sampler})", 48)))
        ax.set_xscale("log")
        ax.set_xlabel("cost-side speedup over vanilla (rows x forwards)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def main(argv: list[str] | None = None) -> list[HeadlineRow]:
    parser = argparse.ArgumentParser(prog="dengine bench headline", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="llada-chain", help="embedded model name or checkpoint folder")
    parser.add_argument("--n", type=positive_int, default=500, help="held-out problems")
    parser.add_argument("--sampler", default="threshold:0.9", help="the parallel sampler (threshold:V or factor:V)")
    parser.add_argument("--policies", nargs="+", default=PUBLISHED,
                        help="policies run with the parallel sampler after 'none'; options as 'entropy:{...}'")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--wall-n", type=int, default=16, help="problems timed one at a time (0: skip)")
    parser.add_argument("--width-record", type=Path, default=None,
                        help="a `dengine bench width --out` JSON record of the family's real width, to price runs")
    add_task_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.n < 1 or args.wall_n < 0:
        parser.error("--batch-size and --n must be positive, --wall-n at least 0")
    sampler_params(args.sampler, 32, 32)  # a bad sampler fails before any work
    width_record = json.loads(args.width_record.read_text()) if args.width_record else None

    task = model_task(args.model, args.task)
    lengths = generation_lengths(task, args.gen_length, args.block_length)
    check = QuietCheck()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size)
    problems = task.held_out(args.n)
    runs = [VANILLA, (args.sampler, "none", None),
            *((args.sampler, *parse_policy(p)) for p in args.policies)]
    rows = []
    for sampler, policy, config in runs:
        params = sampler_params(sampler, *lengths).replace(cache_policy=policy, cache_config=config)
        name = "vanilla" if (sampler, policy) == VANILLA[:2] else label_of(policy, config)
        print(f"{name} / {sampler}", file=sys.stderr, flush=True)
        llm.engine.scheduler.max_num_seqs = args.batch_size
        result = evaluate(llm, problems, params, use_tqdm=not args.no_tqdm)
        batch1 = None
        if args.wall_n:
            llm.engine.scheduler.max_num_seqs = 1
            batch1 = evaluate(llm, problems[: args.wall_n], params, use_tqdm=False).wall_s
        rows.append(HeadlineRow(name, sampler, result, batch1))
    price(rows, width_record)
    text = (f"{args.model} on {task.name}, {args.n} held-out problems, gen {lengths[0]}, block {lengths[1]}\n\n"
            + markdown(rows, args.batch_size, args.wall_n, width_record))
    print(text)
    record = run_record("dengine bench headline", argv, check, model=str(args.model), task=task.name,
                        batch_size=args.batch_size, wall_n=args.wall_n,
                        width_record=None if width_record is None else str(args.width_record),
                        rows=[asdict(row) for row in rows])
    title = plot_title(record, f"{args.model} on {task.name}: accuracy against cost-side speedup")
    write_report(args.out, record, text, (lambda path: plot(rows, title, path)) if args.plot else None)
    return rows


if __name__ == "__main__":
    main()
