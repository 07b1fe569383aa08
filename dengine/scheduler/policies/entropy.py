"""EntropyCache: the entropy of what a sequence just committed decides whether its next step recomputes all.

After each step, E_t = max over the tokens committed at step t of H(p) (natural log), p the distribution each
was committed from. E_t > tau: the next step is a full recompute. Otherwise it computes only the k most
recently committed positions (by commit step, newest first; within a step by position) and the still-masked
positions of the current block; everything else is read from the cache. Step 0 is always full. A step that
commits nothing keeps the previous decision (nothing changed that could make the cache staler).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch

from dengine.scheduler.policies.base import CachePolicy
from dengine.trace import Decision


class EntropyOptions(msgspec.Struct, forbid_unknown_fields=True):
    # Calibrated by benchmarks/calibrate_entropy.py on llada-sudoku and dream-sudoku (task sudoku4, 200
    # held-out puzzles), one token per step and threshold 0.9 (docs/benchmarks.md section 2). Rule: of the
    # tau x k grid, the settings within 1 accuracy point of "none" in all four runs, the one with the least
    # query tokens per forward summed over the runs; ties within 5% go to the most conservative (lowest
    # tau, then largest k). Recalibrate for your own model and task.
    tau: Annotated[float, msgspec.Meta(ge=0.0)] = 0.01
    k: Annotated[int, msgspec.Meta(ge=0)] = 2
    refresh_on_block_start: bool = False


def max_entropy(probs: torch.Tensor) -> float:
    """max_i H(p_i) over the rows of probs (natural log, 0 log 0 = 0)."""
    return torch.special.entr(probs).sum(-1).max().item()


class EntropyCache(CachePolicy):
    name = "entropy"
    Options = EntropyOptions

    def __init__(self, options: EntropyOptions) -> None:
        super().__init__(options)
        self.needs_full_recompute = True  # step 0 has no cache
        self.last_entropy: float | None = None
        # Newest commit step first; within a step ascending positions. Never longer than k.
        self.recent = torch.zeros(0, dtype=torch.long)

    def plan(self, seq) -> torch.Tensor | None:
        if self.needs_full_recompute or (self.options.refresh_on_block_start and seq.block_step == 0):
            return None
        if not self.recent.numel():
            return seq.masked_in_block()
        return torch.cat([self.recent, seq.masked_in_block()])

    def observe(self, seq, outcome, full: bool) -> None:
        if outcome.positions.numel() == 0:
            return
        self.last_entropy = max_entropy(outcome.probs)
        self.needs_full_recompute = self.last_entropy > self.options.tau
        if self.options.k:
            self.recent = torch.cat([outcome.positions, self.recent])[: self.options.k]

    def decision(self, seq) -> Decision:
        full, tau = self.plan(seq) is None, self.options.tau
        if self.last_entropy is None:
            reason = "no commit yet: nothing cached to trust"
        elif self.needs_full_recompute:
            reason = f"max entropy {self.last_entropy:.3g} > tau {tau:g}"
        elif full:
            reason = "block start refresh"
        else:
            reason = (f"max entropy {self.last_entropy:.3g} <= tau {tau:g}: the block's masks and the "
                      f"{self.recent.numel()} latest commits")
        return Decision(full=full, reason=reason, signal=self.last_entropy, threshold=tau)
