"""The attention backend interface and the key/value gather the non-paged backends share."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from dengine.forward_batch import ForwardBatch

# attend(q [N, heads, head_dim], key_cache, value_cache) -> [N, heads, head_dim]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackend:
    """Turns one step's ForwardBatch into the attend function every layer calls."""

    name: ClassVar[str]
    # The KV block size an engine should use with this backend when the user sets none.
    default_block_size: ClassVar[int] = 16

    def plan(self, batch: ForwardBatch) -> AttendFn:
        """Precompute what the step's layers share (masks, index tensors) and return attend."""
        raise NotImplementedError


def gather_kv(cache: torch.Tensor, kv_slots: torch.Tensor) -> torch.Tensor:
    """Contiguous [sum(seq_lens), kv_heads, head_dim] keys (or values) of the batch's sequences."""
    return cache.view(-1, *cache.shape[-2:]).index_select(0, kv_slots)
