"""flash-attn 2 backend: flash_attn_varlen_func, non-causal, over the paged cache.

flash-attn reads the paged cache directly through block_table only when the page size is a multiple
of 256 (mha_varlen_fwd refuses other page sizes); for other block sizes every layer of every step gathers
the keys and values of the whole batch's canvases into contiguous varlen tensors first, which is why this
backend's default block size is 256.
"""

from __future__ import annotations

import torch

from dengine.attention.base import AttendFn, AttentionBackend, gather_kv
from dengine.forward_batch import ForwardBatch

PAGED_BLOCK_MULTIPLE = 256


class FlashAttentionBackend(AttentionBackend):
    """CUDA only; selected automatically when flash-attn is installed."""

    name = "flash-attn"
    default_block_size = PAGED_BLOCK_MULTIPLE

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func

    def plan(self, batch: ForwardBatch) -> AttendFn:
        paged = batch.block_size % PAGED_BLOCK_MULTIPLE == 0
        lengths = dict(
            cu_seqlens_q=batch.cu_seqlens_q,
            cu_seqlens_k=batch.cu_seqlens_k,
            max_seqlen_q=batch.max_query_len,
            max_seqlen_k=batch.max_seq_len,
            causal=False,
        )

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            if paged:
                return self._varlen(q, key_cache, value_cache, block_table=batch.block_tables, **lengths)
            keys, values = gather_kv(key_cache, batch.kv_slots), gather_kv(value_cache, batch.kv_slots)
            return self._varlen(q, keys, values, **lengths)

        return attend
