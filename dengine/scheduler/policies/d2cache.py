"""d2Cache (Jiang et al., 2025): certainty-density selection of masks, attention-rollout selection of the rest.

Step 0 is a full forward; afterwards a step computes only the rows chosen after the previous one, with no
periodic refresh:

1. Masks: score = confidence * certainty density (see dengine.decoding.certainty_density) over the masked
   generated positions, with the current block's scores raised by the highest score so it cannot starve.
   Up to current_k masks are chosen, from the current block start to the end of the block holding the
   current_k-th remaining mask; each contributes the row that scores it (Dream: the one before it).
   Every position committed by the step joins too: its token changed from MASK.
2. The rest: attention rollout over the step's computed rows (per layer, rows not computed are identity;
   W = (E + I) / rowsum; rollout = W_L ... W_1), importance = column sums; the smallest top set of the
   other positions whose normalised importance mass stays <= rollout_p (at least one; rollout_p >= 1: all).
3. inflate_w > 0: every gap between two chosen positions at most inflate_w apart is filled.

Commits happen only among the masks whose logits were computed. A mask's confidence is the top probability of
the distribution the sampler draws from (Decoder.top_probability) at the last computation of its logits.
With certainty_prior (the default, as the authors run d2Cache) a request that sets no sigma also commits by
confidence * density with the policy's sigma.

reference=True reproduces the official code (Kamichanw/d2Cache) where it departs from the method:
* its stored confidence is the step-0 value, never updated (an operator-precedence slip and a write into a
  copy; frozen_confidence=True keeps only this);
* it narrows the block to the masks left before the step, so the search window ends at a multiple of that
  count rather than of the block length;
* on Dream it sets the row before the first generated position (which scores it) only after the rollout
  nucleus is chosen, so that row stays among the nucleus's candidates and is then set or cleared.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch

from dengine.decoding import certainty_density
from dengine.scheduler.policies.base import CachePolicy
from dengine.trace import Decision


class D2CacheOptions(msgspec.Struct, forbid_unknown_fields=True):
    rollout_p: Annotated[float, msgspec.Meta(ge=0.0)] = 0.1
    current_k: Annotated[int, msgspec.Meta(ge=1)] = 32
    sigma: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    inflate_w: Annotated[int, msgspec.Meta(ge=0)] = 0
    certainty_prior: bool = True  # a request without sigma commits by confidence * density with this sigma
    frozen_confidence: bool | None = None  # None: frozen exactly when reference is set
    reference: bool = False  # the official code's departures from the method (module docstring)

    def __post_init__(self) -> None:
        if self.reference and self.frozen_confidence is False:
            raise ValueError("reference reproduces the official code, whose confidence is frozen at step 0: "
                             "frozen_confidence false contradicts it")

    @property
    def frozen(self) -> bool:
        return self.reference or bool(self.frozen_confidence)


def rollout_importance(rows: torch.Tensor, layers: list[torch.Tensor], length: int) -> torch.Tensor:
    """Column sums of the attention rollout when only rows were computed; layers[l] is [len(rows), length].

    1^T W_L ... W_1 as a row vector: W is the identity except on rows, so each layer replaces the entries
    at rows by their weighted rows of W; O(len(rows) * length) per layer instead of a length^3 product.
    """
    importance = torch.ones(length, dtype=torch.float64)
    self_attention = torch.arange(rows.numel())
    for probs in reversed(layers):
        w = probs.double().clone()
        w[self_attention, rows] += 1.0
        w = w / w.sum(-1, keepdim=True)
        weights = importance[rows]
        importance = importance.index_fill(0, rows, 0.0) + weights @ w
    return importance


def nucleus(importance: torch.Tensor, allowed: torch.Tensor, p: float) -> torch.Tensor:
    """Positions, most important first, while their cumulative normalised importance over the allowed
    positions stays <= p; at least one; every allowed position when p >= 1."""
    if not bool(allowed.any()):
        return torch.zeros(0, dtype=torch.long)
    if p >= 1.0:
        return allowed.nonzero().flatten()
    scores = torch.where(allowed, importance, 0.0)
    order = scores.argsort(descending=True, stable=True)
    mass = (scores[order] / scores.sum().clamp_min(1e-300)).cumsum(0)
    keep = mass <= p
    keep[0] = True
    return order[keep & allowed[order]]


def inflate(chosen: torch.Tensor, width: int) -> torch.Tensor:
    """chosen [T] bool with every position between two chosen ones at most width apart also chosen."""
    length = chosen.numel()
    index = torch.arange(length)
    previous = torch.where(chosen, index, -1).cummax(0).values
    following = torch.where(chosen, index, length).flip(0).cummin(0).values.flip(0)
    return chosen | ((following - previous <= width) & (previous >= 0) & (following < length))


class D2Cache(CachePolicy):
    name = "d2cache"
    Options = D2CacheOptions
    scores_planned_rows = True
    records_attention = True

    def __init__(self, options: D2CacheOptions) -> None:
        super().__init__(options)
        self.selected: torch.Tensor | None = None  # next step's rows; None: a full forward
        self.confidence: torch.Tensor | None = None  # [G] of the generated positions

    def default_sigma(self, params) -> float | None:
        if not self.options.certainty_prior or params.remasking == "origin":
            return None
        return self.options.sigma

    def plan(self, seq) -> torch.Tensor | None:
        return self.selected

    def observe(self, seq, outcome, full: bool) -> None:
        o, p = self.options, seq.prompt_len
        self._update_confidence(seq)
        remaining = seq.canvas[p:] == seq.mask_id
        # The search window ends at a multiple of the block length; the official code's, of the masks the block
        # had before this step (its commits all lie in the block).
        unit = seq.masked_in_block().numel() + outcome.positions.numel() if o.reference else None
        masks = self._choose_masks(seq, remaining, unit) + p
        rows = masks - seq.logit_shift
        late_row = o.reference and seq.logit_shift > 0  # official: row p - 1 is set after the nucleus
        chosen = torch.zeros(seq.num_tokens, dtype=torch.bool)
        chosen[rows[rows >= p] if late_row else rows.clamp_min(0)] = True
        chosen[outcome.positions] = True
        attention_rows, layers = seq.last_attention
        importance = rollout_importance(attention_rows, layers, seq.num_tokens)
        chosen[nucleus(importance, ~chosen, o.rollout_p)] = True
        if late_row:
            chosen[p - 1] = bool((rows == p - 1).any())
        if o.inflate_w:
            chosen = inflate(chosen, o.inflate_w)
        self.selected = chosen.nonzero().flatten()

    def decision(self, seq) -> Decision:
        rows = self.selected.numel()
        return Decision(full=False, reason=f"{rows} rows: density-ranked masks, commits, attention rollout",
                        signal=float(rows))

    def _update_confidence(self, seq) -> None:
        positions, logits = seq.last_scored
        if self.confidence is None:
            self.confidence = torch.zeros(seq.num_tokens - seq.prompt_len, dtype=torch.float64)
        elif self.options.frozen:
            return
        self.confidence[positions - seq.prompt_len] = seq.decoder.top_probability(logits)

    def _choose_masks(self, seq, remaining: torch.Tensor, unit: int | None = None) -> torch.Tensor:
        """Stage 1: indices into the generated region of the masks to compute next; the search window ends at
        a multiple of unit (None: the block length)."""
        k = self.options.current_k
        unit = unit or seq.params.resolved_block_length
        if not bool(remaining.any()):
            return torch.zeros(0, dtype=torch.long)
        scores = self.confidence * certainty_density(~remaining, self.options.sigma)
        block = slice(seq.block_start - seq.prompt_len, seq.block_end - seq.prompt_len)
        scores[block] += scores.max()
        counted = remaining.cumsum(0)
        reach = int((counted >= k).nonzero()[0]) if int(counted[-1]) >= k else remaining.numel() - 1
        window = torch.zeros_like(remaining)
        window[block.start : (reach // unit + 1) * unit] = True
        eligible = (window & remaining).nonzero().flatten()
        return eligible[scores[eligible].topk(min(k, eligible.numel())).indices]
