"""d2Cache as its official code runs it, for one sequence (test side only).

Written from Kamichanw/d2Cache at 72feb60: `vanilla_generate` / `generate_step` (src/generation/vanilla.py),
`check_can_generate` and `sample_tokens` (src/generation/utils.py), `d2Cache` (src/cache/d2cache.py) and
`certainty_density` / `nucleus_select` (src/utils/common.py). What that code does, step by step:

* A step computes the rows chosen after the previous one (step 0: all), each overwriting its cached K/V
  and attending to every cached position; rows not computed get zero logits.
* `check_can_generate` narrows the block mask in place to the masks left before the step.
* Every mask is a commit candidate, computed or not: the narrowing of the candidates to the computed rows
  (`transfer_index_mask[active_seq_idx].logical_and_(...)`) writes into a copy. A commit from zero logits
  would be a bug of the official code that dengine does not reproduce, so `d2cache_generate` raises
  `UncomputedCommit` there and the tests draw another prompt (none has needed one so far).
* Confidence is the top probability of `sample_tokens`' distribution (after temperature, top-p, top-k);
  with a sampler `sigma` the commit rule ranks confidence * certainty density of the masks before the step.
  `num_transfer_tokens` commits (at least that many under a threshold) among the block's candidates.
* After the step (`on_step_end`): the confidence kept is the step-0 one (its update is lost to an
  operator-precedence slip and a write into a copy); scores = confidence * density of the masks left, the
  narrowed block's raised by the maximum; the search window runs from the first mask of the narrowed block
  to the k-th remaining mask rounded up to a multiple of the narrowed block's size; the top current_k
  masks in it are chosen, their scoring rows (Dream: the row before) and the step's commits join; the
  rollout nucleus (normalised by sum + 1e-9) adds rows; on Dream the row before the first generated
  position is then set to whether that position was chosen; inflate_w fills short gaps.

Two conventions are dengine's, not the official code's, so that the comparison is about the cache: the mask
token's logit is -inf before any softmax (dengine never commits MASK), and Dream's probabilities (and the
commit scores made from them) are float32.
The density is computed densely in float64 rather than by a float32 FFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reference import dense_reuse_forward, empty_reuse_state
from reference_samplers import _dream_confidence


class UncomputedCommit(AssertionError):
    """The official code would commit a mask whose logits it did not compute (zero logits)."""


@dataclass
class Step:
    computed: list[int] | None  # canvas rows computed; None: all (step 0)
    commits: list[int]  # canvas positions committed


def density(known: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official certainty density: the canvas extended by G known positions on the left and G on the right
    (known only if the last generated one is), weighted by a Gaussian, over the kernel's mass on -3G..3G-1."""
    g = known.numel()
    extended = torch.ones(3 * g, dtype=torch.float64)
    extended[g : 2 * g] = known.double()
    if not bool(known[-1]):
        extended[2 * g :] = 0.0
    i = torch.arange(g, 2 * g, dtype=torch.float64)[:, None]
    j = torch.arange(3 * g, dtype=torch.float64)[None]
    offsets = torch.arange(-3 * g, 3 * g, dtype=torch.float64)
    mass = torch.exp(-(offsets**2) / (2 * sigma**2)).sum()
    return (torch.exp(-((i - j) ** 2) / (2 * sigma**2)) * extended).sum(-1) / mass


def nucleus_select(importance: torch.Tensor, top_p: float, allowed: torch.Tensor) -> torch.Tensor:
    """The official nucleus: sorted normalised scores while their cumulative sum <= top_p, at least one."""
    scores = torch.where(allowed, importance, 0.0)
    probs = scores / (scores.sum() + 1e-9)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = sorted_probs.cumsum(0) <= top_p
    keep[0] = True
    keep &= allowed[order]
    return torch.zeros_like(allowed).scatter_(0, order, keep)


def rollout(rows: torch.Tensor, attention: list[torch.Tensor], length: int) -> torch.Tensor:
    """Dense attention rollout: per layer E (identity where a row was not computed), W = (E + I) / rowsum."""
    product = torch.eye(length, dtype=torch.float64)
    for probs in attention:
        e = torch.eye(length, dtype=torch.float64)
        e[rows] = probs.double()
        w = e + torch.eye(length, dtype=torch.float64)
        product = (w / w.sum(-1, keepdim=True)) @ product
    return product


def inflate(q: torch.Tensor, width: int) -> torch.Tensor:
    t = q.numel()
    index = torch.arange(t)
    following = torch.flip(torch.cummin(torch.flip(torch.where(q, index, t), [0]), 0).values, [0])
    previous = torch.cummax(torch.where(q, index, -1), 0).values
    gap = (following - index) + (index - previous)
    return q | ((gap <= width) & (previous >= 0) & (following < t))


def _sample(logits: torch.Tensor, dream: bool, mask: int, top_p, top_k) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_tokens at temperature 0: (confidence, token) per row."""
    logits = logits.clone()
    logits[:, mask] = -torch.inf
    if dream:
        return _dream_confidence(logits, "maskgit_plus", 0.0, top_p, top_k)
    return F.softmax(logits.double(), dim=-1).max(-1)


def _unmask(scores: torch.Tensor, candidates: torch.Tensor, count: int, threshold: float | None) -> torch.Tensor:
    """confidence_unmasking: every candidate >= threshold, else (or without one) the top `count`."""
    scores = torch.where(candidates, scores, -torch.inf)
    count = min(count, int(candidates.sum()))
    if threshold is not None:
        passing = (scores >= threshold).nonzero().flatten()
        if passing.numel() >= count:
            return passing
    return scores.topk(count).indices


@torch.no_grad()
def d2cache_generate(model, prompt: torch.Tensor, gen_length: int, block_length: int, *, num_transfer_tokens=1,
                     threshold=None, sigma=None, rollout_p=0.1, current_k=32, cache_sigma=10.0, inflate_w=0,
                     top_p=None, top_k=None) -> tuple[torch.Tensor, list[Step]]:
    """The generated tokens and every step's computed rows and commits, as the official code decodes them."""
    c = model.config
    mask, dream = c.mask_token_id, c.logit_shift > 0
    p, g = prompt.numel(), gen_length
    t = p + g
    x = torch.cat([prompt, torch.full((g,), mask)])
    state = empty_reuse_state(model, t)
    nothing = torch.zeros(0, dtype=torch.long)
    q_mask: torch.Tensor | None = None
    kept_confidence: torch.Tensor | None = None
    steps: list[Step] = []
    for b in range(g // block_length):
        block = torch.zeros(g, dtype=torch.bool)
        block[b * block_length : (b + 1) * block_length] = True
        while True:
            block &= x[p:] == mask  # check_can_generate, in place
            if not bool(block.any()):
                break
            remaining = x[p:] == mask
            rows = torch.arange(t) if q_mask is None else q_mask.nonzero().flatten()
            row_logits, attention = dense_reuse_forward(model, x, rows, rows, nothing, 0, state)
            logits = torch.zeros(t, row_logits.shape[-1], dtype=row_logits.dtype)
            logits[rows] = row_logits
            if dream:
                logits = torch.cat([logits[:1], logits[:-1]])
            confidence, tokens = _sample(logits[p:], dream, mask, top_p, top_k)
            confidence = torch.where(remaining, confidence, -torch.inf)
            scores = confidence if sigma is None else confidence * density(~remaining, sigma).to(confidence.dtype)
            commits = _unmask(scores, remaining & block, num_transfer_tokens, threshold)
            scored = torch.zeros(t, dtype=torch.bool)
            scored[rows] = True
            if not bool(scored[p + commits - int(dream)].all()):
                raise UncomputedCommit(f"step {len(steps)} commits from zero logits")
            steps.append(Step(None if q_mask is None else rows.tolist(), sorted((p + commits).tolist())))
            x[p + commits] = tokens[commits]

            # on_step_end
            if kept_confidence is None:
                kept_confidence = confidence.double()
            remaining = x[p:] == mask
            unit = int(block.sum())
            meets = remaining.cumsum(0) >= current_k
            reach = int(meets.int().argmax()) if bool(meets.any()) else g - 1
            search_end = (reach // unit + 1) * unit - 1
            index = torch.arange(g)
            search = (index >= int(block.int().argmax())) & (index <= search_end)
            chosen_scores = kept_confidence * density(~remaining, cache_sigma)
            chosen_scores[block] += chosen_scores.max()
            top = torch.topk(torch.where(search & remaining, chosen_scores, -torch.inf), min(current_k, g)).indices
            selected = torch.zeros(g, dtype=torch.bool).scatter_(0, top, True) & remaining
            response = F.pad(selected[1:], (0, 1), value=False) if dream else selected.clone()
            response[commits] = True
            q = F.pad(response, (p, 0), value=False)
            q |= nucleus_select(rollout(rows, attention, t).sum(0), rollout_p, ~q)
            if dream:
                q[p - 1] = selected[0]
            if inflate_w > 0:
                q = inflate(q, inflate_w)
            q_mask = q
    return x[p:], steps
