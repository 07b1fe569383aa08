"""What a finished request returns: tokens, text and the metrics of how it was decoded."""

from __future__ import annotations

import msgspec

from dengine.trace import Trace


class RequestMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request decoding statistics (see methods.md section 7)."""

    cache_policy: str
    nfe: int  # forward steps the request took part in
    full_recomputes: int
    full_recompute_rate: float
    query_tokens: int  # positions computed over all steps (both CFG branches)
    avg_query_tokens: float  # per step
    committed_tokens: int
    tokens_per_forward: float  # committed tokens per step
    latency_s: float  # arrival to finish
    queue_s: float  # arrival to first scheduled step
    first_block_s: float | None  # arrival to the first block having no mask left
    decision_seconds: float  # time spent in the cache policy's plan / observe
    stopped_early: bool


class TokenLogprob(msgspec.Struct, kw_only=True, array_like=True):
    """A generated token's log-probability in the distribution it was committed from (natural log), and the
    most probable tokens of that distribution with theirs (as many as SamplingParams.logprobs asked)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most probable first


class RequestOutput(msgspec.Struct, kw_only=True):
    """One request's result; token_ids is the whole generation region (shorter only after an early stop)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # decoded up to the first EOS / end-of-turn, special tokens skipped
    finished: bool
    finish_reason: str  # "length" | "eos" (early stop) | "abort"
    metrics: RequestMetrics
    trace: Trace | None = None  # every step, when SamplingParams(trace=True)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams(logprobs=N)
