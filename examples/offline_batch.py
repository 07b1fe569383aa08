"""Decode a batch of prompts with dengine's offline API.

    python examples/offline_batch.py CHECKPOINT_FOLDER [--policy dual] [--threshold 0.9] [--gen-length 128]

Text prompts need a tokenizer in the folder; chat-style prompts go through its chat template.
"""

from __future__ import annotations

import argparse

from dengine import LLM, SamplingParams

PROMPTS = [
    "What is 17 + 25?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Explain what a diffusion language model is in one sentence.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="local checkpoint folder (LLaDA or Dream format)")
    parser.add_argument("--policy", default="none", help="cache policy: none, prefix, dual, ...")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding threshold")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, cache_policy=args.policy)
    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length, threshold=args.threshold,
                            stop_at_eos=True)
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    outputs = llm.chat(conversations, params)
    for prompt, output in zip(PROMPTS, outputs):
        m = output.metrics
        print(f"> {prompt}\n{output.text!r}\n  [{m.nfe} forwards, {m.full_recomputes} full, "
              f"{m.tokens_per_forward:.2f} tokens/forward, {m.avg_query_tokens:.0f} query tokens/forward, "
              f"{m.latency_s:.2f} s]")


if __name__ == "__main__":
    main()
