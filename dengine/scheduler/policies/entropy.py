"""EntropyCache: the entropy of what a sequence just committed decides whether its next step recomputes all.

After each step, E_t = max over the tokens committed at step t of H(p) (natural log), p the distribution each
was committed from. E_t > tau: the next step is a full recompute. Otherwise it computes only the k most
recently committed positions (by commit step, newest first; within a step by position) and the still-masked
positions of the current block; everything else is read from the cache. Step 0 is always full. A step that
commits nothing keeps the previous decision (nothing changed that could make the cache staler).

Under parallel decoding a step commits several tokens, and the paper's rule misreads it (docs/benchmarks.md
2b): the drift follows how much is committed, not the most uncertain commit. Three options extend the rule
there, and reduce to it when one token commits per step: `signal` "sum" scores a step by the entropy mass of
its commits; `accumulate` adds the scores of the steps since the last full recompute (a drift budget);
`recent_steps` j makes partial steps also recompute every token committed in the last j steps, so a step's
commits never keep the K/V they had as masks. `suffix` makes partial steps also recompute every position after
the current block (the answer's still-masked remainder, Fast-dLLM's prefix-cache window): on the long task the
stale K/V that cost accuracy are the suffix's, not the prompt's or the committed tokens' (docs/benchmarks.md
2c); `suffix_tau` recomputes it only once the entropy mass committed since it was last computed reaches
suffix_tau (confident commits barely move what the masks ahead read). Unset options take the defaults of the
sampler and the answer's shape, chosen by measurement (docs/benchmarks.md 2c): ONE_TOKEN_DEFAULTS (the paper's
rule), PARALLEL_DEFAULTS for threshold / factor decoding of a one-block answer (the mass budget),
LONG_PARALLEL_DEFAULTS for an answer of several blocks (no full refresh; the suffix recomputed by entropy).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import torch

from dengine.scheduler.policies.base import CachePolicy
from dengine.trace import Decision


class EntropyOptions(msgspec.Struct, forbid_unknown_fields=True):
    """The paper's rule is signal "max", accumulate false, recent_steps 0, suffix false; an unset option
    (None) takes ONE_TOKEN_DEFAULTS or, for threshold / factor decoding, PARALLEL_DEFAULTS (an answer of one
    block) or LONG_PARALLEL_DEFAULTS (several blocks)."""

    # Calibrated by benchmarks/calibrate_entropy.py on the embedded models: one token per step on
    # llada-sudoku and dream-sudoku (task sudoku4, 200 held-out puzzles; docs/benchmarks.md section 2),
    # threshold 0.9 on those (one-block answers) and on llada-chain and dream-chain (sudoku-chain, answers
    # of 8 blocks; the candidates' final comparison on 500 held-out of each chain model and 1500 of each Sudoku
    # model; section 2c).
    # Rule, per sampler and answer shape: of the grid, the settings within 1 accuracy point of "none" in every
    # run, the one with the least work summed over the runs (each relative to its "none"); ties within 5% go
    # to the most conservative (lowest tau, then largest k). Recalibrate for your own model and task.
    tau: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    refresh_on_block_start: bool = False
    signal: Literal["max", "sum"] | None = None  # how one step's commits' entropies combine
    accumulate: bool | None = None  # sum the step signals since the last full recompute
    recent_steps: Annotated[int, msgspec.Meta(ge=0)] | None = None  # also recompute all commits of the last j steps
    suffix: bool | None = None  # partial steps also recompute every position after the current block
    # with suffix: only once the entropy mass committed since the suffix was last computed reaches suffix_tau
    suffix_tau: Annotated[float, msgspec.Meta(ge=0.0)] | None = None

    def resolved(self, params=None) -> "EntropyOptions":
        """Every unset option filled with the default for the request's sampler and number of blocks (params, a
        SamplingParams; None: one token per step)."""
        if params is None or not params.parallel:
            defaults = ONE_TOKEN_DEFAULTS
        else:
            defaults = LONG_PARALLEL_DEFAULTS if params.num_blocks > 1 else PARALLEL_DEFAULTS
        return msgspec.structs.replace(self, **{name: value for name, value in defaults.items()
                                                if getattr(self, name) is None})


ONE_TOKEN_DEFAULTS = {"tau": 0.01, "k": 2, "signal": "max", "accumulate": False, "recent_steps": 0, "suffix": False,
                      "suffix_tau": 0.0}
# Threshold / factor decoding: the joint rule (within 1 point of "none" on every run, least summed work) over
# threshold 0.9, 500-1500 held-out each, both model families, applied per answer shape (docs/benchmarks.md 2c, end):
# * an answer of one block (sudoku4, 1000 held-out each and a fresh 500 each): the mass budget at tau 0.2 with the
#   last step's commits, within 0.4 points of "none" on every run at 73-79% of its rows x forwards (the paper's rule:
#   90-95%). Tau 0.3 and 0.4 lose 1.4 on dream-sudoku's fresh 500. The prompt's K/V must follow the answer there:
#   tau 1 loses 1.8-2.4 points, never refreshing 2.6-10.4, and no trigger tried reaches 40% of the work within a
#   point (only a per-puzzle oracle over refresh schedules does: the commits' signals do not tell which answers need
#   a refresh).
PARALLEL_DEFAULTS = {"tau": 0.2, "k": 8, "signal": "sum", "accumulate": True, "recent_steps": 1, "suffix": False,
                     "suffix_tau": 0.0}
# * an answer of several blocks (sudoku-chain): no full refresh after step 0; partial steps recompute the last
#   step's commits and, once the entropy mass committed since reaches 0.3, every position after the block: within
#   a point of "none" at 28-30% of its rows x forwards (17-20x less than one token a step without a cache).
LONG_PARALLEL_DEFAULTS = {"tau": 1e9, "k": 8, "signal": "sum", "accumulate": True, "recent_steps": 1, "suffix": True,
                          "suffix_tau": 0.3}


def commit_entropies(probs: torch.Tensor) -> torch.Tensor:
    """H(p_i) of each row of probs (natural log, 0 log 0 = 0)."""
    return torch.special.entr(probs).sum(-1)


def step_entropy(entropy: torch.Tensor, signal: str) -> float:
    """A step's commits scored by the max ("max") or the sum ("sum") of their entropies."""
    return (entropy.max() if signal == "max" else entropy.sum()).item()


def max_entropy(probs: torch.Tensor) -> float:
    """max_i H(p_i) over the rows of probs: the paper's signal."""
    return step_entropy(commit_entropies(probs), "max")


class EntropyCache(CachePolicy):
    name = "entropy"
    Options = EntropyOptions

    def __init__(self, options: EntropyOptions) -> None:
        super().__init__(options)
        self.needs_full_recompute = True  # step 0 has no cache
        self.last_entropy: float | None = None  # the signal compared with tau (a budget when accumulating)
        self.effective: EntropyOptions | None = None  # options with the sampler's defaults, at the first observe
        # Newest commit step first; within a step ascending positions: the k newest tokens, or every token of
        # the recent_steps newest steps if that is more.
        self.recent = torch.zeros(0, dtype=torch.long)
        self.recent_steps: list[int] = []  # commits per step in self.recent, newest first
        self.suffix_stale = 0.0  # entropy mass committed since the suffix was last computed
        self.refresh_suffix = True  # whether the next partial step computes the suffix

    def plan(self, seq) -> torch.Tensor | None:
        if self.needs_full_recompute or (self.options.refresh_on_block_start and seq.block_step == 0):
            return None
        parts = [self.recent, seq.masked_in_block()] if self.recent.numel() else [seq.masked_in_block()]
        suffix = self.effective.suffix and self.refresh_suffix  # (effective: set by the first observe)
        if suffix and seq.block_end < seq.num_tokens:
            parts.append(torch.arange(seq.block_end, seq.num_tokens))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def observe(self, seq, outcome, full: bool) -> None:
        if outcome.positions.numel() == 0:
            return
        if self.effective is None:
            self.effective = self.options.resolved(None if seq is None else seq.params)
        options = self.effective
        entropy = commit_entropies(outcome.probs)
        signal = step_entropy(entropy, options.signal)
        if options.accumulate and not full and self.last_entropy is not None:
            signal += self.last_entropy  # no refresh since: the staleness adds up
        self.last_entropy = signal
        self.needs_full_recompute = signal > options.tau
        if options.suffix and options.suffix_tau:  # (suffix_tau 0: every partial step, nothing to track)
            stale = 0.0 if full or self.refresh_suffix else self.suffix_stale  # did the step just run compute it
            self.suffix_stale = stale + step_entropy(entropy, "sum")
            self.refresh_suffix = self.suffix_stale >= options.suffix_tau
        counts = [outcome.positions.numel(), *self.recent_steps]
        keep = max(options.k, sum(counts[: options.recent_steps]))
        self.recent = torch.cat([outcome.positions, self.recent])[:keep]
        self.recent_steps, total = [], 0
        for count in counts:  # the newest recent_steps steps are always kept whole
            if total >= keep:
                break
            self.recent_steps.append(min(count, keep - total))
            total += self.recent_steps[-1]

    def decision(self, seq) -> Decision:
        options = self.effective or self.options.resolved(seq.params)
        full, tau = self.plan(seq) is None, options.tau
        name = ("max entropy" if options.signal == "max" else "entropy mass") + (
            " since the last refresh" if options.accumulate else "")
        if self.last_entropy is None:
            reason = "no commit yet: nothing cached to trust"
        elif self.needs_full_recompute:
            reason = f"{name} {self.last_entropy:.3g} > tau {tau:g}"
        elif full:
            reason = "block start refresh"
        else:
            reason = (f"{name} {self.last_entropy:.3g} <= tau {tau:g}: the block's masks and the "
                      f"{self.recent.numel()} latest commits" + (", and every position after the block"
                                                                  if options.suffix and self.refresh_suffix
                                                                  else ""))
        return Decision(full=full, reason=reason, signal=self.last_entropy, threshold=tau)
