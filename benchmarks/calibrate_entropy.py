"""Calibrate EntropyCache's tau and k on held-out problems, for a given model and sampler.

    python benchmarks/calibrate_entropy.py --model llada-reverse --n 100 --sampler one-token --out docs/bench/calib-one
    python benchmarks/calibrate_entropy.py --model llada-reverse --n 100 --sampler threshold:0.9 --out ...

Runs policy "none" and then every (tau, k) with the same sampler on the same problems, prints the table
(accuracy, NFE, full-recompute rate, query tokens per step, wall time, speedup vs "none") and names the
fastest setting whose accuracy is within --tolerance points of "none". Recalibrate for your own model by
pointing --model at its folder; for another task, swap the problems and checker (dengine.tasks).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from pathlib import Path

from dengine.bench.accuracy import compare, markdown_table
from dengine.bench.policies import sampler_params
from dengine.bench.report import run_record, write_report
from dengine.llm import LLM
from dengine.tasks.digit_reversal import split_problems


def best_setting(results, tolerance: float, same_work: float = 0.05):
    """The fastest entropy result whose accuracy is within tolerance (fraction) of the baseline.

    Wall time is noisy; settings whose query tokens per forward are within same_work (fraction) of the
    fastest one's do the same computation and count as equally fast: of those, the most conservative
    (lowest tau, then largest k) is chosen.
    """
    baseline = results[0]
    eligible = [r for r in results[1:] if r.accuracy >= baseline.accuracy - tolerance]
    if not eligible:
        return None
    fastest = max(eligible, key=lambda r: r.speedup)
    tied = [r for r in eligible if r.avg_query_tokens <= fastest.avg_query_tokens * (1 + same_work)]
    return min(tied, key=lambda r: (r.cache_config["tau"], -r.cache_config["k"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-reverse")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 8, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--sampler", default="one-token", help="one-token, threshold:V or factor:V")
    parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy points allowed below 'none'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size)
    _, problems = split_problems(0, args.n)
    base = sampler_params(args.sampler, args.gen_length, args.block_length)
    grid = [("entropy", {"tau": tau, "k": k}) for tau, k in itertools.product(args.taus, args.ks)]
    results = compare(llm, problems, base, [("none", None), *grid], use_tqdm=not args.no_tqdm)
    best = best_setting(results, args.tolerance / 100)
    if best is None:
        verdict = f"no setting is within {args.tolerance} points of 'none'"
    else:
        verdict = (f"fastest within {args.tolerance} points of 'none' (ties in work -> most conservative): "
                   f"{json.dumps(best.cache_config)} "
                   f"({best.accuracy:.1%} vs {results[0].accuracy:.1%}, {best.speedup:.2f}x)")
    markdown = markdown_table(results) + "\n\n" + verdict
    print(markdown)
    record = run_record("python benchmarks/calibrate_entropy.py", argv,
                        best=None if best is None else best.cache_config, results=[asdict(r) for r in results])
    write_report(args.out, record, markdown)


if __name__ == "__main__":
    main()
