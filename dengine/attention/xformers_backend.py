"""xformers backend: memory_efficient_attention with a block-diagonal mask over the ragged batch."""

from __future__ import annotations

import torch

from dengine.attention.base import AttendFn, AttentionBackend, gather_kv
from dengine.forward_batch import ForwardBatch


class XFormersAttentionBackend(AttentionBackend):
    """CUDA only; selected automatically when xformers (and not flash-attn) is installed."""

    name = "xformers"

    def __init__(self) -> None:
        from xformers.ops import fmha

        self._fmha = fmha

    def plan(self, batch: ForwardBatch) -> AttendFn:
        # The mask's index tensors must be on the inputs' device (from_seqlens takes it since xformers 0.0.27).
        mask = self._fmha.attn_bias.BlockDiagonalMask.from_seqlens(
            q_seqlen=batch.query_lens, kv_seqlen=batch.seq_lens, device=batch.input_ids.device
        )

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            n, heads, head_dim = q.shape
            kv_heads = key_cache.shape[-2]
            group = heads // kv_heads
            # GQA in xformers' 5-D layout [batch, tokens, kv groups, heads per group, head_dim].
            keys = gather_kv(key_cache, batch.kv_slots)[None, :, :, None, :]
            values = gather_kv(value_cache, batch.kv_slots)[None, :, :, None, :]
            shape = (1, keys.shape[1], kv_heads, group, head_dim)
            out = self._fmha.memory_efficient_attention_forward(
                q.view(1, n, kv_heads, group, head_dim), keys.expand(shape), values.expand(shape), attn_bias=mask
            )
            return out.reshape(n, heads, head_dim)

        return attend
