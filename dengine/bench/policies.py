"""The policy table: accuracy next to speed for every cache policy, per model, sampler and batch size.

    python -m dengine.bench.policies --models llada-sudoku dream-sudoku \\
        --policies none entropy dual dllm d2cache --samplers one-token threshold:0.9 --batch-sizes 1 16 --n 64 \\
        --out docs/bench/policies

Every (model, sampler, batch size) runs each policy on the same held-out problems of the model's task
(task.json in its folder, or --task) in one process, the first policy being the baseline of the speedups
(as in `dengine.bench.accuracy`). Writes a Markdown table, JSON,
and with --plot (needs matplotlib, the `bench` extra) accuracy against speedup as a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dengine.bench.accuracy import PolicyResult, add_task_arguments, compare, markdown_table, model_task, parse_policy
from dengine.bench.report import QuietCheck, figure, plot_title, run_record, write_report
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.llm import LLM
from dengine.sampling_params import SamplingParams
from dengine.tasks import generation_lengths


def sampler_params(spec: str, gen_length: int, block_length: int) -> SamplingParams:
    """'one-token' (exactly one commit per step), 'threshold:0.9' or 'factor:1.0' (Fast-dLLM parallel decoding).

    One token per step is `tokens_per_step=1`: LLaDA's schedule at steps == gen_length commits the same, but
    Dream's timestep schedule commits none on a block's first step and two on its last, two tokens decided
    together where a one-token rule decides them one after the other."""
    name, _, value = spec.partition(":")
    base = {"gen_length": gen_length, "block_length": block_length, "stop_at_eos": True}
    if name == "one-token" and not value:
        return SamplingParams(**base, tokens_per_step=1)
    if name in ("threshold", "factor") and value:
        return SamplingParams(**base, **{name: float(value)})
    raise ValueError(f"sampler {spec!r}: use one-token, threshold:VALUE or factor:VALUE")


def table(rows: list[dict]) -> str:
    leading = {"model": [row["model"] for row in rows], "sampler": [row["sampler"] for row in rows],
               "batch": [str(row["batch_size"]) for row in rows]}
    return markdown_table([row["result"] for row in rows], leading)


PALETTE = [f"C{i}" for i in range(10)] + ["black", "grey", "olive", "navy", "maroon"]


def plot(rows: list[dict], path: Path, title: str | None = None) -> None:
    """Accuracy against speedup, one point per run: one marker per policy (with its options), one colour per
    model, sampler and batch size; two legends beside the axes (markers, colours), not one entry per point."""
    from matplotlib.lines import Line2D

    with figure(path, title, figsize=(10, 4.5)) as (_, ax):
        markers: dict[str, str] = {}
        colours: dict[str, str] = {}
        for row in rows:
            r: PolicyResult = row["result"]
            policy = r.policy + (f" {json.dumps(r.cache_config)}" if r.cache_config else "")
            marker = markers.setdefault(policy, "os^Dvx*P<>hH8pd"[len(markers) % 15])
            run = f"{row['model']} / {row['sampler']} / batch {row['batch_size']}"
            colour = colours.setdefault(run, PALETTE[len(colours) % len(PALETTE)])
            ax.scatter(r.speedup, 100 * r.accuracy, marker=marker, color=colour)
        ax.set_xlabel("speedup over the baseline policy (wall clock)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        policy_legend = ax.legend(
            [Line2D([], [], marker=m, color="black", linestyle="") for m in markers.values()], list(markers),
            title="policy", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.add_artist(policy_legend)
        ax.legend([Line2D([], [], marker="o", color=c, linestyle="") for c in colours.values()], list(colours),
                  title="model / sampler / batch", fontsize=7, title_fontsize=7, loc="lower left",
                  bbox_to_anchor=(1.01, 0.0))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="dengine bench policies", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llada-sudoku", "dream-sudoku"])
    parser.add_argument("--policies", nargs="+", default=["none", "entropy", "dual", "dllm", "d2cache"],
                        help='the first is the baseline; options as \'entropy:{"tau": 0.5}\'')
    parser.add_argument("--samplers", nargs="+", default=["one-token", "threshold:0.9"])
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="max_num_seqs of each run")
    parser.add_argument("--n", type=positive_int, default=64, help="held-out problems per run")
    add_task_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    policies = [parse_policy(p) for p in args.policies]
    if any(b < 1 for b in args.batch_sizes):
        parser.error("batch sizes must be positive")

    rows, tasks, check = [], {}, QuietCheck()
    for model in args.models:
        task = model_task(model, args.task)
        tasks[str(model)] = task.name
        problems = task.held_out(args.n)
        lengths = generation_lengths(task, args.gen_length, args.block_length)
        samplers = [(spec, sampler_params(spec, *lengths)) for spec in args.samplers]
        llm = LLM(model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes))
        for spec, params in samplers:
            for batch_size in args.batch_sizes:
                llm.engine.scheduler.max_num_seqs = batch_size
                print(f"{model} / {spec} / batch {batch_size}", file=sys.stderr, flush=True)
                for result in compare(llm, problems, params, policies, use_tqdm=not args.no_tqdm):
                    rows.append({"model": str(model), "sampler": spec, "batch_size": batch_size, "result": result})
    markdown = table(rows)
    print(markdown)
    record = run_record("python -m dengine.bench.policies", argv, check, n=args.n, tasks=tasks,
                        gen_length=args.gen_length,
                        block_length=args.block_length,
                        rows=[{k: v for k, v in row.items() if k != "result"} | asdict(row["result"]) for row in rows])
    what = "accuracy against speedup: " + ", ".join(f"{model} ({task})" for model, task in tasks.items())
    write_report(args.out, record, markdown,
                 (lambda path: plot(rows, path, plot_title(record, what))) if args.plot else None)
    return rows


if __name__ == "__main__":
    main()
