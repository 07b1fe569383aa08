"""Where does the stale K/V that costs accuracy live? EntropyCache partial steps with one more window recomputed.

    python benchmarks/stale_windows.py --model llada-chain --n 48 none prefix 'e-suffix:{"tau": 1e9, "k": 8, "recent_steps": 1}'

Each experimental policy is the `entropy` policy (its options as given) whose partial steps also recompute one
window of positions: e-suffix every position after the current block, e-nextN the N positions after it, e-tail
the canvas's last 32, e-nexttail the next 32 and the last 32, e-stride every other position after the block,
e-suffixalt the suffix on every other step of a block, e-block the whole current block, e-answer every answer
position up to the block's end, e-prompt the prompt. Threshold 0.9, the task's lengths, batch 16, bf16.
An experiment: its figures are in docs/benchmarks.md 2c; the `suffix` option is what was taken from it.
"""

from __future__ import annotations

import argparse

import torch

from dengine.bench.accuracy import compare, markdown_table, model_task, parse_policy
from dengine.bench.policies import sampler_params
from dengine.llm import LLM
from dengine.scheduler import policies
from dengine.scheduler.policies.entropy import EntropyCache
from dengine.tasks import generation_lengths


def windowed(name: str, window) -> type[EntropyCache]:
    """The entropy policy whose partial steps also recompute window(seq) (positions, or None for none)."""

    def plan(self, seq):
        base = EntropyCache.plan(self, seq)
        extra = None if base is None else window(seq)
        return base if extra is None else torch.unique(torch.cat([base, extra]))

    return type(name, (EntropyCache,), {"name": name, "plan": plan})


def after(seq, count: int | None = None) -> torch.Tensor:
    end = seq.num_tokens if count is None else min(seq.num_tokens, seq.block_end + count)
    return torch.arange(seq.block_end, end)


WINDOWS = {
    "e-suffix": lambda seq: after(seq),
    "e-next16": lambda seq: after(seq, 16),
    "e-next": lambda seq: after(seq, seq.params.resolved_block_length),
    "e-next64": lambda seq: after(seq, 64),
    "e-tail": lambda seq: torch.arange(max(seq.block_end, seq.num_tokens - 32), seq.num_tokens),
    "e-nexttail": lambda seq: torch.cat([after(seq, 32), torch.arange(max(seq.block_end, seq.num_tokens - 32),
                                                                      seq.num_tokens)]),
    "e-stride": lambda seq: torch.arange(seq.block_end, seq.num_tokens, 2),
    "e-suffixalt": lambda seq: after(seq) if seq.block_step % 2 else None,
    "e-block": lambda seq: torch.arange(seq.block_start, seq.block_end),
    "e-answer": lambda seq: torch.arange(seq.prompt_len, seq.block_end),
    "e-prompt": lambda seq: torch.arange(0, seq.prompt_len),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-chain")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("policies", nargs="+", help="none, prefix, entropy:{...} or an experimental e-...:{...}")
    args = parser.parse_args()
    for name, window in WINDOWS.items():
        policies.POLICIES[name] = windowed(name, window)
    task = model_task(args.model, None)
    llm = LLM(args.model, dtype="bfloat16", max_num_seqs=16)
    base = sampler_params("threshold:0.9", *generation_lengths(task, None, None))
    results = compare(llm, task.held_out(args.n), base, [parse_policy(p) for p in args.policies], use_tqdm=False)
    print(markdown_table(results), flush=True)


if __name__ == "__main__":
    main()
