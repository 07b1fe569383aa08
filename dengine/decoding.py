"""The published samplers: which masked positions of the current block to commit, and to what.

A Decoder sees one sequence's candidate positions (its still-masked positions in the current block) and
their logits, and returns the commits. LLaDA's rules follow its reference `generate` (fixed schedule,
float64 Gumbel-max temperature, low-confidence or random remasking); Dream's follow `diffusion_generate`
(timestep schedule, maskgit_plus / topk_margin / entropy / origin, top-p / top-k with the official
default top_k of 50, alg_temp); both take Fast-dLLM's threshold and factor rules, and a fixed count per
step instead of the schedule (`tokens_per_step`, the d2Cache framework's `num_transfer_tokens`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dengine.sampling_params import SamplingParams


@dataclass
class StepOutcome:
    """The commits of one step, with the distribution each token was committed from."""

    positions: torch.Tensor  # [n] canvas positions, ascending
    tokens: torch.Tensor  # [n]
    probs: torch.Tensor  # [n, vocab]

    def ranked(self, top_n: int) -> tuple[list[float], list[list[int]], list[list[float]]]:
        """Each committed token's probability, and its distribution's top_n tokens with theirs (float64)."""
        probs = self.probs.double()
        chosen = probs.gather(-1, self.tokens[:, None]).squeeze(-1).tolist()
        top = probs.topk(min(top_n, probs.shape[-1]), dim=-1)
        return chosen, top.indices.tolist(), top.values.tolist()


def llada_transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Commits per step for one block: an even split, the remainder going to the earliest steps."""
    base, remainder = divmod(num_masked, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always the top one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    remove_sorted[..., 1:] = cumulative[..., :-1] > top_p
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def certainty_density(known: torch.Tensor, sigma: float) -> torch.Tensor:
    """d2Cache's certainty density of each generated position: Gaussian-weighted known neighbours.

    D(i) = sum_j exp(-(i - j)^2 / (2 sigma^2)) known(j) / M, j over the generation region extended by its own
    length G on both sides: the left side (the prompt) counts as known, the right side as known only when the
    last generated position is. M is the kernel's whole mass, sum_d exp(-d^2 / (2 sigma^2)) over the 6G
    offsets -3G..3G-1 that d2Cache's reference builds its kernel on, the same for every position: near the
    ends of the extended region the window holds less of the kernel, so even a position among known tokens
    has a density below 1 there. Float64; the numerator's kernel is cut at 40 sigma, where its weight is
    below 1e-300.
    """
    g = known.numel()
    extended = torch.ones(3 * g, dtype=torch.float64)
    extended[g : 2 * g] = known.double()
    if not bool(known[-1]):
        extended[2 * g :] = 0.0
    kernel, mass = _density_kernel(g, sigma)
    weighted = F.conv1d(extended.view(1, 1, -1), kernel, padding=kernel.shape[-1] // 2).flatten()[g : 2 * g]
    return weighted / mass


@functools.lru_cache(maxsize=64)
def _density_kernel(g: int, sigma: float) -> tuple[torch.Tensor, float]:
    """The Gaussian kernel for a generation region of g positions, and its whole mass."""
    radius = min(2 * g - 1, math.ceil(40 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2)).view(1, 1, -1)
    every_offset = torch.arange(-3 * g, 3 * g, dtype=torch.float64)
    return kernel, float(torch.exp(-(every_offset**2) / (2 * sigma**2)).sum())


def threshold_count(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM threshold rule: indices of every confidence >= threshold, at least the top one."""
    chosen = confidence >= threshold
    chosen[confidence.argmax()] = True
    return chosen.nonzero().flatten()


def factor_count(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM factor rule: the top n where n is the largest count with (n + 1)(1 - c_(n)) < factor."""
    ranked = confidence.sort(descending=True)
    counts = torch.arange(1, confidence.numel() + 1, dtype=confidence.dtype)
    passing = int(((counts + 1) * (1 - ranked.values) < factor).sum())
    return ranked.indices[: max(1, passing)]


class Decoder:
    """Per-request sampler state: the random generator and, for LLaDA, the block's commit schedule."""

    def __init__(
        self,
        params: SamplingParams,
        model_type: str,
        mask_token_id: int,
        eos_token_id: int,
        eot_token_id: int | None,
        generator: torch.Generator,
    ) -> None:
        self.params = params
        self.is_dream = model_type == "dream"
        self.mask = mask_token_id
        self.eos = eos_token_id
        self.eot = eot_token_id
        self.generator = generator
        self._schedule: list[int] = []
        eps = 1e-3 if params.eps is None else params.eps
        self._timesteps = torch.linspace(1, eps, params.steps_per_block + 1)

    def start_block(self, num_masked: int) -> None:
        self._schedule = llada_transfer_schedule(num_masked, self.params.steps_per_block)

    def step(
        self,
        candidates: torch.Tensor,
        logits: torch.Tensor,
        block_step: int,
        head_only: bool,
        density: torch.Tensor | None = None,
    ) -> StepOutcome:
        """Commit some of candidates (ascending canvas positions) given their logits [n, vocab].

        head_only commits exactly candidates[0] (Dream's block-start rule under prefix / dual caching).
        density (certainty-prior decoding) multiplies each candidate's confidence before the commit rule.
        The mask token itself is never committed: a committed MASK would stay masked forever.
        """
        logits = logits.clone()
        logits[:, self.mask] = -torch.inf
        if self.is_dream and self.params.remasking == "origin" and not head_only:
            chosen = self._origin_choice(candidates.numel(), block_step)
            probs = self._dream_distribution(logits[chosen])
            return StepOutcome(candidates[chosen], self._dream_draw(probs), probs)
        if self.is_dream:
            tokens, confidence, probs = self._dream_sample(logits)
        else:
            tokens, confidence, probs = self._llada_sample(logits)
        if density is not None:
            # -inf marks a token that may never be chosen first; keep it so, even where the density is 0.
            confidence = torch.where(confidence.isneginf(), confidence, confidence * density.to(confidence.dtype))
        if head_only:
            chosen = torch.zeros(1, dtype=torch.long)
        else:
            chosen = self._choose(confidence, block_step).sort().values
        return StepOutcome(candidates[chosen], tokens[chosen], probs[chosen])

    def top_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row, the top token's probability in the distribution the sampler draws from (LLaDA: the softmax in
        softmax_dtype; Dream: after temperature, top-p and top-k), MASK excluded: d2Cache's stored confidence."""
        logits = logits.clone()
        logits[:, self.mask] = -torch.inf
        if self.is_dream:
            return self._dream_distribution(logits).max(-1).values.double()
        if self.params.logits_eos_inf:
            logits[:, self.eos] = -torch.inf
        return self._llada_distribution(logits).max(-1).values.double()

    def _llada_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.params.softmax_dtype == "float32" else torch.float64
        return F.softmax(logits.to(dtype), dim=-1)

    def _llada_sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.params
        if p.logits_eos_inf:
            logits[:, self.eos] = -torch.inf
        if p.temperature > 0:
            noise = torch.rand(logits.shape, dtype=torch.float64, generator=self.generator)
            scores = logits.double().exp() / (-noise.log()) ** p.temperature
            # An excluded token (-inf logit: MASK, EOS under logits_eos_inf) scores 0 / x, which is NaN once its
            # noise term underflows to 0 at a high temperature (u > 0.9994 at 100), and NaN wins argmax.
            tokens = scores.masked_fill_(logits.isneginf(), -1.0).argmax(-1)
        else:
            tokens = logits.argmax(-1)
        probs = self._llada_distribution(logits)
        if p.remasking == "random":
            confidence = torch.rand(tokens.shape, dtype=torch.float64, generator=self.generator)
        else:
            confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
        if p.confidence_eos_eot_inf:
            never = tokens == self.eos
            if self.eot is not None:
                never |= tokens == self.eot
            confidence = confidence.masked_fill(never, -torch.inf)
        return tokens, confidence, probs

    def _dream_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits.float()
        if p.temperature > 0:
            logits = logits / p.temperature
        if p.top_p is not None and p.top_p < 1:
            logits = top_p_filter(logits, p.top_p)
        if p.dream_top_k is not None:
            logits = top_k_filter(logits, p.dream_top_k)
        return logits.softmax(-1)

    def _dream_draw(self, probs: torch.Tensor) -> torch.Tensor:
        if self.params.temperature > 0:
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return probs.argmax(-1)

    def _dream_sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self._dream_distribution(logits)
        tokens = self._dream_draw(probs)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
        if self.params.remasking == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
        elif self.params.remasking == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        return tokens, confidence, probs

    def _timestep_pair(self, block_step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Dream's (t, s) for this step of the block, and whether it is the block's last step."""
        last = block_step >= self.params.steps_per_block - 1
        # A policy that limits the candidates (d2Cache) can need steps past the schedule: each is a last step.
        t = self._timesteps[min(block_step, self.params.steps_per_block - 1)]
        return t, self._timesteps[block_step + 1] if not last else self._timesteps[-1], last

    def _origin_choice(self, n: int, block_step: int) -> torch.Tensor:
        """'origin': each candidate is committed with probability 1 - s/t (all on the last step)."""
        t, s, last = self._timestep_pair(block_step)
        coin = torch.rand(n, generator=self.generator)  # drawn on the last step too, as the reference does
        return torch.arange(n) if last else (coin < 1 - s / t).nonzero().flatten()

    def _choose(self, confidence: torch.Tensor, block_step: int) -> torch.Tensor:
        p = self.params
        if p.threshold is not None:
            return threshold_count(confidence, p.threshold)
        if p.factor is not None:
            return factor_count(confidence, p.factor)
        n = confidence.numel()
        if p.tokens_per_step is not None:
            count = min(p.tokens_per_step, n)
        elif not self.is_dream:
            count = min(self._schedule[block_step], n) if block_step < len(self._schedule) else n
        else:
            t, s, last = self._timestep_pair(block_step)
            count = n if last else int(torch.tensor(float(n)) * (1 - s / t))
        if count == 0:
            return torch.zeros(0, dtype=torch.long)
        if p.alg_temp:
            weights = F.softmax(confidence / p.alg_temp, dim=-1)
            return torch.multinomial(weights, count, generator=self.generator)
        return confidence.topk(count).indices
