"""Calibrate EntropyCache's tau and k on a model's held-out task problems, next to the published policies.

    python benchmarks/calibrate_entropy.py --model llada-sudoku --n 200 --samplers one-token threshold:0.9 \\
        --out docs/bench/calib-llada-sudoku --plot

    python benchmarks/calibrate_entropy.py --combine docs/bench/calib-llada-sudoku.json \
        docs/bench/calib-dream-sudoku.json

For each sampler, runs policy "none", the published policies at their published settings (--baselines) and
every (tau, k) of the grid on the same problems in one process, prints the table (accuracy, NFE, full
recomputes, query tokens per forward, wall time, speedup against "none") and names, per sampler, the
setting chosen by the rule: the least work (query tokens per forward) whose accuracy is within --tolerance
points of "none"; settings within 5% of that work count as ties, and the most conservative of them (lowest
tau, then largest k) wins. With --plot, a Pareto figure: accuracy against query tokens per forward and
against wall time, per sampler. Recalibrate for your own model by pointing --model at its folder (its
task.json names the task, or pass --task). --combine reads recorded runs (their JSON) and applies the
rule jointly: the (tau, k) within --tolerance points of "none" in every run, with the least work summed
over the runs (each run's work relative to its "none"); this is how the shipped defaults were chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from pathlib import Path

from dengine.bench.accuracy import PolicyResult, add_task_arguments, compare, markdown_table, model_task, parse_policy
from dengine.bench.policies import sampler_params
from dengine.bench.report import QuietCheck, figure, plot_title, run_record, write_report
from dengine.llm import LLM
from dengine.tasks import generation_lengths

NEVER = 1e9  # a tau no entropy reaches: never refresh after step 0


def best_setting(results: list[PolicyResult], tolerance: float, same_work: float = 0.05) -> PolicyResult | None:
    """The entropy result doing the least work whose accuracy is within tolerance (fraction) of results[0].

    Work is query tokens per forward (wall time is noisy); settings within same_work (fraction) of the least
    count as ties, and the most conservative of them (lowest tau, then largest k) is chosen.
    """
    baseline = results[0]
    eligible = [r for r in results[1:] if r.policy == "entropy" and r.accuracy >= baseline.accuracy - tolerance]
    if not eligible:
        return None
    least = min(r.avg_query_tokens for r in eligible)
    tied = [r for r in eligible if r.avg_query_tokens <= least * (1 + same_work)]
    return min(tied, key=lambda r: conservative(r.cache_config))


def joint_best(runs: list[list[dict]], tolerance: float) -> tuple[dict | None, list[str]]:
    """The (tau, k) within tolerance (fraction) of "none" in every run (lists of PolicyResult dicts), with the
    least summed relative work; ties (within 5%) go to the most conservative. Also a table of candidates."""
    candidates: dict[str, list[dict]] = {}
    for results in runs:
        for r in results[1:]:
            if r["policy"] == "entropy" and r["cache_config"]:
                candidates.setdefault(json.dumps(r["cache_config"], sort_keys=True), []).append(r)
    rows, eligible = [], []
    for key, found in sorted(candidates.items(), key=lambda item: conservative(json.loads(item[0]))):
        if len(found) != len(runs):
            continue
        config = json.loads(key)
        drops = [results[0]["accuracy"] - r["accuracy"] for results, r in zip(runs, found)]
        work = sum(r["avg_query_tokens"] / results[0]["avg_query_tokens"] for results, r in zip(runs, found))
        ok = all(drop <= tolerance + 1e-12 for drop in drops)
        rows.append(f"| {config['tau']:g} | {config['k']} | {variant(config)} | "
                    f"{' / '.join(f'{-100 * d:+.1f}' for d in drops)} | {work:.2f} | {'yes' if ok else ''} |")
        if ok:
            eligible.append((work, config))
    if not eligible:
        return None, rows
    least = min(work for work, _ in eligible)
    return min((c for w, c in eligible if w <= least * 1.05), key=conservative), rows


def conservative(config: dict) -> tuple:
    """The order in which ties in work are broken: lowest tau, then largest k (then the variant's text)."""
    return config["tau"], -config["k"], variant(config)


def variant(config: dict) -> str:
    """The options of a setting other than tau and k ('' for the paper's rule at the sampler's defaults)."""
    rest = {name: value for name, value in config.items() if name not in ("tau", "k")}
    return json.dumps(rest, sort_keys=True) if rest else ""


def combine(paths: list[Path], tolerance: float) -> dict | None:
    """Apply the joint rule to recorded calibration runs and print the candidates' table."""
    records = [json.loads(path.read_text()) for path in paths]
    runs, names = [], []
    for path, record in zip(paths, records):
        for sampler, results in record["runs"].items():
            runs.append(results)
            names.append(f"{record['model']} {sampler}")
    best, rows = joint_best(runs, tolerance / 100)
    print(f"runs: {' / '.join(names)}\n\n| tau | k | other options | accuracy vs none (points, per run) | work (sum of "
          f"query tokens relative to none) | within {tolerance} points in every run |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\njoint choice (least summed work, ties -> most conservative): {json.dumps(best)}")
    return best


def label(result: PolicyResult) -> str:
    return result.policy + (f" {json.dumps(result.cache_config)}" if result.cache_config else "")


def plot(runs: dict[str, list[PolicyResult]], best: dict[str, PolicyResult | None], title: str, path: Path) -> None:
    """Per sampler, accuracy against query tokens per forward (left) and wall time (right)."""
    with figure(path, title, nrows=len(runs), ncols=2, figsize=(12, 4.2 * len(runs)), squeeze=False) as (_, axes):
        for row, (sampler, results) in enumerate(runs.items()):
            for col, (metric, xlabel) in enumerate((("avg_query_tokens", "query tokens per forward"),
                                                    ("wall_s", "wall time (s)"))):
                ax = axes[row][col]
                grid = [r for r in results if r.policy == "entropy" and r.cache_config]
                lines = sorted({(variant(r.cache_config), r.cache_config["k"]) for r in grid})
                for i, (extra, k) in enumerate(lines):
                    points = sorted((r for r in grid if (variant(r.cache_config), r.cache_config["k"]) == (extra, k)),
                                    key=lambda r: r.cache_config["tau"])
                    ax.plot([getattr(r, metric) for r in points], [100 * r.accuracy for r in points],
                            marker="o^sD"[i // 10 % 4], linestyle="-" if not extra else "--", color=f"C{i % 10}",
                            alpha=0.8, label=f"entropy k={k} {extra} (tau rising)")
                others = [r for r in results if r not in grid]
                for j, r in enumerate(others):
                    ax.scatter(getattr(r, metric), 100 * r.accuracy, marker="s*^Dvx<>P"[j % 9], s=70, color="black",
                               label=label(r), zorder=3)
                chosen = best.get(sampler)
                if chosen is not None:
                    ax.scatter(getattr(chosen, metric), 100 * chosen.accuracy, s=220, facecolors="none",
                               edgecolors="red", linewidths=2, label=f"chosen: {json.dumps(chosen.cache_config)}",
                               zorder=4)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("accuracy (%)")
                ax.set_title(sampler, fontsize=10)
                ax.grid(True, alpha=0.3)
                if col == 1:
                    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def main(argv: list[str] | None = None) -> dict[str, PolicyResult | None] | dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-sudoku")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, NEVER])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8, 32])
    parser.add_argument("--variants", nargs="+", default=["{}"],
                        help="JSON options added to every (tau, k) of the grid, one grid per variant, e.g. "
                             '\'{}\' \'{"signal": "sum", "accumulate": true, "recent_steps": 1}\' ({} leaves the '
                             "other options at the sampler's defaults)")
    parser.add_argument("--baselines", nargs="+", default=["dual", "dllm", "d2cache"],
                        help="published policies at their published settings, run on the same problems")
    parser.add_argument("--samplers", nargs="+", default=["one-token", "threshold:0.9"],
                        help="one-token, threshold:V or factor:V")
    parser.add_argument("--batch-size", type=int, default=64)
    add_task_arguments(parser)
    parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy points allowed below 'none'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--no-tqdm", action="store_true")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="instead of running: the joint choice over recorded runs (their JSON files)")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.tolerance)

    task = model_task(args.model, args.task)
    check = QuietCheck()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size)
    problems = task.held_out(args.n)
    grid = [("entropy", {"tau": tau, "k": k, **json.loads(extra)})
            for extra, tau, k in itertools.product(args.variants, args.taus, args.ks)]
    policies = [("none", None), *(parse_policy(p) for p in args.baselines), *grid]
    runs, best, sections = {}, {}, []
    for sampler in args.samplers:
        base = sampler_params(sampler, *generation_lengths(task, args.gen_length, args.block_length))
        results = compare(llm, problems, base, policies, use_tqdm=not args.no_tqdm)
        chosen = best_setting(results, args.tolerance / 100)
        runs[sampler], best[sampler] = results, chosen
        if chosen is None:
            verdict = f"no setting is within {args.tolerance} points of 'none'"
        else:
            verdict = (f"least work within {args.tolerance} points of 'none' (ties in work -> most conservative): "
                       f"{json.dumps(chosen.cache_config)} ({chosen.accuracy:.1%} vs {results[0].accuracy:.1%}, "
                       f"{chosen.avg_query_tokens:.1f} vs {results[0].avg_query_tokens:.1f} query tokens per "
                       f"forward, {chosen.speedup:.2f}x)")
        sections.append(f"### {sampler}\n\n{markdown_table(results)}\n\n{verdict}")
        print(sections[-1], flush=True)
    markdown = f"{args.model} on {task.name}, {args.n} held-out problems\n\n" + "\n\n".join(sections)
    record = run_record("python benchmarks/calibrate_entropy.py", argv, check, model=str(args.model), task=task.name,
                        best={s: None if b is None else b.cache_config for s, b in best.items()},
                        runs={s: [asdict(r) for r in results] for s, results in runs.items()})
    title = plot_title(record, f"EntropyCache calibration: {args.model} on {task.name}")
    write_report(args.out, record, markdown, (lambda path: plot(runs, best, title, path)) if args.plot else None)
    return best


if __name__ == "__main__":
    main()
