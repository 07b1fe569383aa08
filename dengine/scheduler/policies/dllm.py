"""dLLM-Cache (Liu et al., 2025): per-layer cached K, V, attention and FFN outputs; V-similarity refresh.

Every layer's K, V, attention output (after the output projection) and FFN output are cached for the prompt
and the response. The prompt refreshes on steps where step % kp == 0, the response where step % kr == 0 (the
step counter runs over the whole generation; step 0 refreshes both). Layer 0 always recomputes every row it
computes. On the other layers of a step where the response does not refresh, V is computed for every
response position and overwritten in the cache, and only the int(rho * R) response positions whose new V is
least similar to the cached V (cosine, per layer) recompute Q, K, attention and FFN; the others add their
cached outputs to the residual stream. A prompt that does not refresh is not computed at all (its K and V are
read from the cache; only Dream's scoring row before the first response position joins, reusing its outputs).

Defaults kp 50, kr 4, rho 0.25: the fallback of the comparison d2Cache published. The dLLM-Cache authors tune
kp / kr per task and model (e.g. LLaDA-8B-Instruct GSM8K 50 / 7, HumanEval 25 / 5; their demos 100 / 7):
docs/sampling.md lists them against the official code.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch

from dengine.scheduler.policies.base import CachePolicy
from dengine.trace import Decision


class DLLMCacheOptions(msgspec.Struct, forbid_unknown_fields=True):
    rho: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.25
    kp: Annotated[int, msgspec.Meta(ge=1)] = 50
    kr: Annotated[int, msgspec.Meta(ge=1)] = 4


class DLLMCache(CachePolicy):
    name = "dllm"
    Options = DLLMCacheOptions
    stores_layer_outputs = True

    def __init__(self, options: DLLMCacheOptions) -> None:
        super().__init__(options)
        self.step = 0

    def _refreshes(self) -> tuple[bool, bool]:
        return self.step % self.options.kp == 0, self.step % self.options.kr == 0

    def plan(self, seq) -> torch.Tensor | None:
        prompt, _ = self._refreshes()
        return None if prompt else torch.arange(seq.prompt_len, seq.num_tokens)

    def reuse(self, seq) -> tuple[torch.Tensor, torch.Tensor, int]:
        prompt, response = self._refreshes()
        empty = torch.zeros(0, dtype=torch.long)
        always = torch.arange(seq.prompt_len) if prompt else empty
        responses = torch.arange(seq.prompt_len, seq.num_tokens)
        if response:
            return torch.cat([always, responses]), empty, 0
        return always, responses, int(self.options.rho * responses.numel())

    def observe(self, seq, outcome, full: bool) -> None:
        self.step += 1

    def decision(self, seq) -> Decision:
        prompt, response = self._refreshes()
        if response:
            reason = "prompt and response refresh" if prompt else "response refresh"
        else:
            rows = seq.num_tokens - seq.prompt_len
            reason = (f"{'prompt refresh; ' if prompt else ''}{int(self.options.rho * rows)} of {rows} response rows "
                      "recomputed per layer, by V similarity")
        return Decision(full=prompt and response, reason=reason)
