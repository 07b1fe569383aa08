"""Fast-dLLM's PrefixCache and DualCache: refresh at every block start, then compute a window."""

from __future__ import annotations

import torch

from dengine.scheduler.policies.base import CachePolicy


class PrefixCache(CachePolicy):
    """After the block-start refresh: the current block and everything after it; the prefix is frozen."""

    name = "prefix"
    commits_block_head_at_refresh = True

    def plan(self, seq) -> torch.Tensor | None:
        if seq.block_step == 0:
            return None
        return torch.arange(seq.block_start, seq.num_tokens)


class DualCache(CachePolicy):
    """After the block-start refresh: the current block only; prefix and suffix are frozen."""

    name = "dual"
    commits_block_head_at_refresh = True

    def plan(self, seq) -> torch.Tensor | None:
        if seq.block_step == 0:
            return None
        return torch.arange(seq.block_start, seq.block_end)
