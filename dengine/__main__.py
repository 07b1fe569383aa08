"""`python -m dengine`: the main job on the embedded model.

Decodes held-out digit-reversal problems with EntropyCache and with exact decoding ("none"), prints a few
answers, the accuracy of both, tokens/s and the speedup of the cache.
"""

from __future__ import annotations

import argparse

from dengine.bench.accuracy import compare, markdown_table
from dengine.llm import LLM
from dengine.sampling_params import SamplingParams
from dengine.tasks.digit_reversal import split_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="embedded model name or checkpoint folder (default: llada-reverse)")
    parser.add_argument("--n", type=int, default=64, help="held-out problems")
    args = parser.parse_args()
    llm = LLM(args.model)
    _, problems = split_problems(0, args.n)
    base = SamplingParams(gen_length=128, block_length=32, stop_at_eos=True)
    results = compare(llm, problems, base, [("none", None), ("entropy", None)])
    cached = results[-1]
    for sample in cached.samples:
        verdict = "right" if sample["correct"] == "True" else "wrong"
        print(f"Q: {sample['question']}\nA: {sample['got']}   ({verdict})\n")
    print(markdown_table(results))
    print(f"\nEntropyCache: accuracy {cached.accuracy:.1%} (exact decoding {results[0].accuracy:.1%}), "
          f"{cached.tokens_per_s:.0f} tokens/s, {cached.speedup:.2f}x faster than policy 'none'")


if __name__ == "__main__":
    main()
