"""Decode a batch of chats with dengine's offline API.

    python examples/offline_batch.py                                   # the embedded llada-sudoku, its task
    python examples/offline_batch.py dream-reverse --policy entropy    # another embedded model
    python examples/offline_batch.py /models/LLaDA-8B-Instruct --policy dual --threshold 0.9 --gen-length 256

An embedded model is asked held-out problems of the task it was trained on (its folder's task.json) and each
answer is checked; a real checkpoint folder gets a few general questions (it needs a tokenizer and a chat
template in the folder).
"""

from __future__ import annotations

import argparse

from dengine import LLM, SamplingParams
from dengine.assets import DEFAULT_MODEL, EMBEDDED_MODELS
from dengine.tasks import task_of_model

GENERAL = [
    "What is 17 + 25?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Explain what a diffusion language model is in one sentence.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="embedded model name or checkpoint folder")
    parser.add_argument("--policy", default="entropy", help="cache policy: none, prefix, dual, entropy, ...")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--gen-length", type=int, default=None, help="default: the task's, or 128")
    parser.add_argument("--block-length", type=int, default=None, help="default: the task's, or 32")
    parser.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding threshold")
    parser.add_argument("--n", type=int, default=6, help="problems asked an embedded model")
    args = parser.parse_args(argv)

    task = task_of_model(EMBEDDED_MODELS[args.model]) if args.model in EMBEDDED_MODELS else None
    problems = task.held_out(args.n) if task else [None] * len(GENERAL)
    questions = [p.question for p in problems] if task else GENERAL
    llm = LLM(args.model, dtype=args.dtype, cache_policy=args.policy)
    params = SamplingParams(gen_length=args.gen_length or (task.gen_length if task else 128),
                            block_length=args.block_length or (task.block_length if task else 32),
                            threshold=args.threshold, stop_at_eos=True)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params)
    for question, problem, output in zip(questions, problems, outputs):
        m = output.metrics
        verdict = "" if problem is None else ("  (right)" if problem.check(output.text) else "  (wrong)")
        print(f"> {question}\n{output.text!r}{verdict}\n  [{m.nfe} forwards, {m.full_recomputes} full, "
              f"{m.tokens_per_forward:.2f} tokens/forward, {m.avg_query_tokens:.0f} query tokens/forward, "
              f"{m.latency_s:.2f} s]")


if __name__ == "__main__":
    main()
