"""The cache-policy interface: what to compute next step, and what to learn from this step."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import msgspec
import torch

from dengine.decoding import Decoder, StepOutcome
from dengine.sampling_params import SamplingParams
from dengine.trace import Decision


class SequenceView(Protocol):
    """What a policy reads of its sequence (dengine.scheduler.sequence.Sequence), and never writes."""

    canvas: torch.Tensor
    params: SamplingParams
    prompt_len: int
    num_tokens: int
    mask_id: int
    logit_shift: int
    block_step: int
    decoder: Decoder  # its sampler (d2Cache takes a mask's confidence from it)
    # d2Cache: the last step's scored masks and their logits; its computed rows and their attention per layer
    last_scored: tuple[torch.Tensor, torch.Tensor] | None
    last_attention: tuple[torch.Tensor, list[torch.Tensor]] | None

    @property
    def block_start(self) -> int: ...

    @property
    def block_end(self) -> int: ...

    def masked_in_block(self) -> torch.Tensor: ...


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """A policy without options."""


class CachePolicy:
    """One instance per sequence. plan() must not change state: a deferred step is planned again."""

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    # Dream only: a refresh step at a block start commits exactly the block's first position, so that
    # later windows starting at the block start never need the output at block_start - 1.
    commits_block_head_at_refresh: ClassVar[bool] = False
    # dLLM-Cache: the sequence reserves pool blocks for per-layer attention and FFN outputs, and reuse()
    # says which rows recompute them.
    stores_layer_outputs: ClassVar[bool] = False
    # d2Cache: plan() chooses every computed row, masks outside the current block included; the step reads
    # logits at every masked position those rows score, and commits only among the block's.
    scores_planned_rows: ClassVar[bool] = False
    # d2Cache: the runner records the head-averaged attention probabilities of the computed rows.
    records_attention: ClassVar[bool] = False

    def __init__(self, options: msgspec.Struct) -> None:
        self.options = options

    @classmethod
    def parse_options(cls, config: dict[str, Any] | None) -> msgspec.Struct:
        """Validate a cache_config dict into the policy's options, naming the bad key or value."""
        try:
            return msgspec.convert(config or {}, cls.Options)
        except (msgspec.ValidationError, ValueError) as exc:
            raise ValueError(f"cache_config for policy {cls.name!r}: {exc}") from None

    def default_sigma(self, params: SamplingParams) -> float | None:
        """The certainty-prior sigma a request decodes with when it sets none (None: by confidence alone)."""
        return None

    def plan(self, seq: SequenceView) -> torch.Tensor | None:
        """Positions to recompute this step (None: all). The engine adds the positions it must score."""
        raise NotImplementedError

    def reuse(self, seq: SequenceView) -> tuple[torch.Tensor, torch.Tensor, int]:
        """stores_layer_outputs only: (positions recomputed at every layer, candidates, how many candidates
        each layer past the first recomputes); the other computed rows reuse their cached outputs."""
        raise NotImplementedError

    def observe(self, seq: SequenceView, outcome: StepOutcome, full: bool) -> None:
        """Learn from the step just applied (its commits and whether it was a full recompute)."""

    def decision(self, seq: SequenceView) -> Decision:
        """For traces, after a step (and its block change): whether the next step is full, and why."""
        chosen = self.plan(seq)
        if chosen is None:
            return Decision(full=True, reason="full recompute")
        return Decision(full=False, reason=f"{chosen.numel()} planned rows")
