"""Calibrate EntropyCache's tau and k on held-out problems, for a given model and sampler.

    python benchmarks/calibrate_entropy.py --model llada-reverse --n 200 --taus 0.1 0.3 1 3 --ks 0 8 32
    python benchmarks/calibrate_entropy.py --model llada-reverse --threshold 0.9 ...

Runs policy "none" and then every (tau, k) with the same sampler on the same problems, prints the table
(accuracy, NFE, full-recompute rate, query tokens per step, wall time, speedup vs "none") and names the
fastest setting whose accuracy is within --tolerance points of "none". Recalibrate for your own model by
pointing --model at its folder; for another task, adapt the problems (dengine.tasks) or the checker.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from dengine.bench.accuracy import compare, markdown_table
from dengine.llm import LLM
from dengine.sampling_params import SamplingParams
from dengine.tasks.digit_reversal import split_problems


def best_setting(results, tolerance: float):
    """The fastest entropy result whose accuracy is within tolerance (fraction) of the baseline."""
    baseline = results[0]
    eligible = [r for r in results[1:] if r.accuracy >= baseline.accuracy - tolerance]
    return max(eligible, key=lambda r: r.speedup, default=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-reverse")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 8, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy points allowed below 'none'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size)
    _, problems = split_problems(0, args.n)
    base = SamplingParams(gen_length=args.gen_length, block_length=args.block_length, threshold=args.threshold)
    grid = [("entropy", {"tau": tau, "k": k}) for tau, k in itertools.product(args.taus, args.ks)]
    results = compare(llm, problems, base, [("none", None), *grid])
    print(markdown_table(results))
    best = best_setting(results, args.tolerance / 100)
    if best is None:
        print(f"\nno setting is within {args.tolerance} points of 'none'")
    else:
        print(f"\nfastest within {args.tolerance} points of 'none': {json.dumps(best.cache_config)} "
              f"({best.accuracy:.1%} vs {results[0].accuracy:.1%}, {best.speedup:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": [r.__dict__ for r in results]}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
