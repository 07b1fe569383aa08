"""One request's decoding state: its canvas, current block, cache policy, sampler and metrics."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Hashable

import torch

from dengine.config import ModelConfig
from dengine.decoding import Decoder, StepOutcome, certainty_density
from dengine.scheduler.policies.base import CachePolicy
from dengine.model_runner import CachedOutputs, SequenceQuery
from dengine.outputs import TokenLogprob
from dengine.sampling_params import SamplingParams
from dengine.trace import TraceRecorder


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class StepMetrics:
    """Counters a request accumulates; RequestMetrics is their public, immutable form."""

    def __init__(self, arrival_time: float) -> None:
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_block_time: float | None = None
        self.finished_time: float | None = None
        self.steps = 0
        self.full_recomputes = 0
        self.query_tokens = 0
        self.committed_tokens = 0
        self.decision_seconds = 0.0


class Sequence:
    """prompt + [MASK] * gen_length, decoded block by block; CFG adds an unconditional twin canvas."""

    def __init__(
        self,
        request_id: Hashable,
        prompt_token_ids: list[int],
        params: SamplingParams,
        config: ModelConfig,
        policy: CachePolicy,
        eot_token_id: int | None,
        seed: int,
        prompt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.policy = policy
        self.mask_id = config.mask_token_id
        self.eos_id = config.eos_token_id
        self.eot_id = eot_token_id
        self.logit_shift = config.logit_shift
        self.is_dream = config.model_type == "dream"
        self.prompt_len = len(prompt_token_ids)
        self.num_tokens = self.prompt_len + params.gen_length
        self.canvas = torch.full((self.num_tokens,), self.mask_id, dtype=torch.long)
        self.canvas[: self.prompt_len] = torch.tensor(prompt_token_ids, dtype=torch.long)
        # Classifier-free guidance: the same canvas with the prompt masked, decoded in lockstep.
        self.uncond_canvas = None
        if params.cfg_scale > 0:
            self.uncond_canvas = self.canvas.clone()
            self.uncond_canvas[: self.prompt_len] = self.mask_id
        self.block_tables: list[list[int]] = []
        self.output_tables: list[list[int]] = []  # per-layer output blocks, when the policy stores them
        self.status = SequenceStatus.WAITING
        self.block_index = 0
        self.block_step = 0
        self.decoder = Decoder(
            params, config.model_type, self.mask_id, self.eos_id, eot_token_id, torch.Generator().manual_seed(seed)
        )
        self.decoder.start_block(params.resolved_block_length)
        # certainty-prior decoding: the request's sigma, else its policy's default (d2cache: on, as its authors run it)
        self.sigma = params.sigma if params.sigma is not None else policy.default_sigma(params)
        self.metrics = StepMetrics(time.perf_counter())
        self.stopped_at: int | None = None  # canvas index of the EOS that ended the request early
        self._masked: torch.Tensor | None = None
        self._scored = torch.zeros(0, dtype=torch.long)  # this step's scored masks, as last planned
        # What the last step computed, for policies that learn from more than the commits (d2Cache):
        # the masked positions scored and their logits; the computed rows and their attention per layer.
        self.last_scored: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_attention: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.trace = TraceRecorder() if params.trace else None
        # per generated position, the committed token's log-probability (SamplingParams.logprobs)
        self.logprobs: list[TokenLogprob | None] | None = None if params.logprobs is None else [None] * params.gen_length

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def num_branches(self) -> int:
        return 1 if self.uncond_canvas is None else 2

    @property
    def kv_tokens(self) -> int:
        """KV slots this sequence reserves (CFG doubles them)."""
        return self.num_tokens * self.num_branches

    @property
    def block_start(self) -> int:
        return self.prompt_len + self.block_index * self.params.resolved_block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.resolved_block_length

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)

    def masked_in_block(self) -> torch.Tensor:
        """Still-masked positions of the current block, ascending: the step's commit candidates.

        Memoised until the canvas or the block changes (apply), since the sequence, its policy and the
        sampler all ask for it every step."""
        if self._masked is None:
            block = self.canvas[self.block_start : self.block_end]
            self._masked = (block == self.mask_id).nonzero().flatten() + self.block_start
        return self._masked

    # -- one step ---------------------------------------------------------------------------------

    def plan(self) -> list[SequenceQuery]:
        """This step's query sets (one per branch); pure, so a deferred step can be planned again."""
        start = time.perf_counter()
        chosen = self.policy.plan(self)
        reuse = self.policy.reuse(self) if self.policy.stores_layer_outputs else None
        self.metrics.decision_seconds += time.perf_counter() - start
        self._scored = self._scored_masks(chosen)
        scored = (self._scored - self.logit_shift).clamp_min(0)
        if chosen is None:
            query = torch.arange(self.num_tokens)
        else:
            query = torch.cat([chosen, scored]).unique()
        canvases = [self.canvas] if self.uncond_canvas is None else [self.canvas, self.uncond_canvas]
        outputs = self.output_tables or [None] * len(canvases)
        return [
            SequenceQuery(
                canvas,
                table,
                query,
                logits_positions=scored,
                cached_outputs=None if reuse is None else CachedOutputs(output_table, *reuse),
                record_attention=self.policy.records_attention and branch == 0,  # the conditional branch
            )
            for branch, (canvas, table, output_table) in enumerate(zip(canvases, self.block_tables, outputs))
        ]

    def _scored_masks(self, chosen: torch.Tensor | None) -> torch.Tensor:
        """Masked positions whose logits this step reads: the current block's; for a policy that picks its
        own rows, every masked position they score, plus the block's if they score none of it."""
        if not self.policy.scores_planned_rows:
            return self.masked_in_block()
        masked = (self.canvas[self.prompt_len :] == self.mask_id).nonzero().flatten() + self.prompt_len
        if chosen is None:
            return masked
        masked = masked[torch.isin((masked - self.logit_shift).clamp_min(0), chosen)]
        if not bool(((masked >= self.block_start) & (masked < self.block_end)).any()):
            masked = torch.cat([masked, self.masked_in_block()]).unique()
        return masked

    def apply(self, queries: list[SequenceQuery], logits: list[torch.Tensor]) -> StepOutcome:
        """Commit from this step's logits, let the policy learn, and advance blocks."""
        rows = logits[0]
        if self.uncond_canvas is not None:
            cond, uncond = logits
            rows = uncond + (self.params.cfg_scale + 1) * (cond - uncond)
        candidates = self._scored
        if self.policy.scores_planned_rows:
            self.last_scored = (candidates, rows)
            in_block = (candidates >= self.block_start) & (candidates < self.block_end)
            candidates, rows = candidates[in_block], rows[in_block]
        if queries[0].attention is not None:
            self.last_attention = (queries[0].query_positions, queries[0].attention)
        full = queries[0].is_full
        head_only = (
            self.is_dream
            and full
            and self.block_step == 0
            and self.policy.commits_block_head_at_refresh
            and (self.params.parallel or self.params.steps_per_block > 1)
        )
        if self.params.min_tokens:
            rows = self._forbid_early_end(candidates, rows)
        density = None
        if self.sigma is not None:
            known = self.canvas[self.prompt_len :] != self.mask_id
            density = certainty_density(known, self.sigma)[candidates - self.prompt_len]
        outcome = self.decoder.step(candidates, rows, self.block_step, head_only, density)
        self.canvas[outcome.positions] = outcome.tokens
        self._masked = None
        if self.uncond_canvas is not None:
            self.uncond_canvas[outcome.positions] = outcome.tokens

        m = self.metrics
        m.steps += 1
        m.full_recomputes += int(full)
        m.query_tokens += sum(q.query_positions.numel() for q in queries)
        m.committed_tokens += outcome.positions.numel()
        start = time.perf_counter()
        self.policy.observe(self, outcome, full)
        m.decision_seconds += time.perf_counter() - start
        self.last_scored = self.last_attention = None  # inputs of this observe only; logits can be large

        self.block_step += 1
        if self.params.stop_at_eos and self._answer_is_fixed():
            self.status = SequenceStatus.FINISHED
        elif not bool((self.canvas[self.block_start : self.block_end] == self.mask_id).any()):
            if m.first_block_time is None:
                m.first_block_time = time.perf_counter()
            self.block_index += 1
            self.block_step = 0
            if self.block_index == self.params.num_blocks:
                self.status = SequenceStatus.FINISHED
            else:
                self.decoder.start_block(int((self.canvas[self.block_start : self.block_end] == self.mask_id).sum()))
        if self.is_finished:
            m.finished_time = time.perf_counter()
        if self.trace is not None:
            self.trace.record(self, queries, outcome, full)
        if self.logprobs is not None:
            self._record_logprobs(outcome)
        return outcome

    def _record_logprobs(self, outcome: StepOutcome) -> None:
        chosen, top_ids, top_probs = outcome.ranked(self.params.logprobs)
        for position, token, p, ids, probs in zip(outcome.positions.tolist(), outcome.tokens.tolist(), chosen,
                                                  top_ids, top_probs):
            self.logprobs[position - self.prompt_len] = TokenLogprob(
                token_id=token, logprob=_log(p), top=[(t, _log(q)) for t, q in zip(ids, probs)])

    def _forbid_early_end(self, candidates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """min_tokens: the rows of the first min_tokens generated positions with EOS and end of turn excluded, so
        an answer is at least that long wherever the canvas commits first."""
        early = (candidates - self.prompt_len) < self.params.min_tokens
        if not bool(early.any()):
            return rows
        stops = torch.tensor([t for t in (self.eos_id, self.eot_id) if t is not None])
        rows = rows.clone()
        rows[early.nonzero().flatten()[:, None], stops] = -torch.inf
        return rows

    def _answer_is_fixed(self) -> bool:
        """True once an EOS is committed with every generated position before it committed."""
        generated = self.canvas[self.prompt_len :]
        eos = (generated == self.eos_id).nonzero()
        if eos.numel() == 0:
            return False
        first = int(eos[0])
        if bool((generated[:first] == self.mask_id).any()):
            return False
        self.stopped_at = self.prompt_len + first
        return True

    def final_token_ids(self) -> list[int]:
        """The generated tokens that can no longer change: the completed blocks (semi-AR makes blocks final
        left to right), or everything once the sequence is finished."""
        if self.is_finished:
            return self.generated_token_ids()
        return self.canvas[self.prompt_len : self.block_start].tolist()

    def generated_token_ids(self) -> list[int]:
        """The generation region; after an early stop, up to and including the stopping EOS."""
        end = self.num_tokens if self.stopped_at is None else self.stopped_at + 1
        return self.canvas[self.prompt_len : end].tolist()


def _log(probability: float) -> float:
    """Natural log, floored at OpenAI's -9999 for a token the distribution excludes (JSON has no -inf)."""
    return math.log(probability) if probability > 0 else -9999.0
