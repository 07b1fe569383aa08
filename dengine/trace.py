"""Denoising traces: per step, what a request computed, what its cache policy decided, and what it committed.

`SamplingParams(trace=True)` gives the request a TraceRecorder; `RequestOutput.trace` is the finished Trace.
A request without one does no tracing work at all. With one, each step costs O(commits x vocab) for the
commits' entropies and top alternatives, the same order as EntropyCache's own signal, plus a list of the
computed positions on partial steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from dengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dengine.decoding import StepOutcome
    from dengine.model_runner import SequenceQuery
    from dengine.scheduler.sequence import Sequence

NUM_ALTERNATIVES = 5


class Alternative(msgspec.Struct, kw_only=True):
    token_id: int
    text: str | None
    prob: float


class Commit(msgspec.Struct, kw_only=True):
    """One position committed at a step, with the distribution it was committed from."""

    position: int  # canvas index (prompt positions first)
    token_id: int
    text: str | None
    confidence: float  # the committed token's probability
    entropy: float  # of the whole distribution, natural log
    alternatives: list[Alternative]  # its most probable tokens, the committed one included


class Decision(msgspec.Struct, kw_only=True):
    """What a cache policy decided for the next step, and the signal it decided on."""

    full: bool  # the next step recomputes every position at every layer
    reason: str
    signal: float | None = None  # EntropyCache: max entropy of the last commits; d2Cache: rows selected
    threshold: float | None = None  # EntropyCache: tau (signal > threshold means full)


class TraceStep(msgspec.Struct, kw_only=True):
    index: int
    block: int
    full: bool
    computed: list[int] | None  # canvas positions computed (the conditional branch); None: all, a full step
    query_tokens: int  # rows computed over every CFG branch, as RequestMetrics.query_tokens counts them
    commits: list[Commit]
    decision: Decision | None  # for the next step; None after the last step


class Trace(msgspec.Struct, kw_only=True):
    """A request's whole decoding: replaying the steps' commits over prompt + masks rebuilds its output."""

    request_id: str
    model: str
    family: str
    cache_policy: str
    params: SamplingParams
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_tokens: list[str | None]  # text of each prompt token
    mask_token_id: int
    stop_token_ids: list[int]  # EOS and end of turn: the answer ends before the first of them
    token_ids: list[int]  # the request's final output
    text: str | None
    steps: list[TraceStep]


class TraceRecorder:
    """Collects a sequence's steps as they happen; texts are filled in once, when the Trace is built."""

    def __init__(self) -> None:
        self.steps: list[TraceStep] = []

    def record(self, seq: Sequence, queries: list[SequenceQuery], outcome: StepOutcome, full: bool) -> None:
        """Record the step seq just applied; called once seq has advanced its block."""
        confidence, top_ids, top_probs = outcome.ranked(NUM_ALTERNATIVES)
        entropy = torch.special.entr(outcome.probs.double()).sum(-1).tolist()
        commits = [
            Commit(position=position, token_id=token, text=None, confidence=c, entropy=h,
                   alternatives=[Alternative(token_id=t, text=None, prob=p) for t, p in zip(ids, values)])
            for position, token, c, h, ids, values in zip(
                outcome.positions.tolist(), outcome.tokens.tolist(), confidence, entropy, top_ids, top_probs)
        ]
        # A step that completed its block has already moved seq on to the next one.
        block = seq.block_index - 1 if seq.block_step == 0 else seq.block_index
        self.steps.append(TraceStep(
            index=len(self.steps),
            block=block,
            full=full,
            computed=None if full else queries[0].query_positions.tolist(),
            query_tokens=sum(q.query_positions.numel() for q in queries),
            commits=commits,
            decision=None if seq.is_finished else seq.policy.decision(seq),
        ))

    def build(self, seq: Sequence, token_text: Callable[[int], str | None], **fields: Any) -> Trace:
        """The finished Trace, every token id given its text."""
        for step in self.steps:
            for commit in step.commits:
                commit.text = token_text(commit.token_id)
                for alternative in commit.alternatives:
                    alternative.text = token_text(alternative.token_id)
        return Trace(
            request_id=str(seq.request_id),
            cache_policy=seq.policy.name,
            params=seq.params,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            prompt_tokens=[token_text(token) for token in seq.prompt_token_ids],
            mask_token_id=seq.mask_id,
            steps=self.steps,
            **fields,
        )
