"""Portable backend: torch's scaled_dot_product_attention, one call per sequence (no padding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dengine.attention.base import AttentionBackend, gather_kv
from dengine.forward_batch import AttendFn, ForwardBatch


class TorchAttentionBackend(AttentionBackend):
    """Runs on every device; the default on CPU."""

    name = "torch"

    def plan(self, batch: ForwardBatch) -> AttendFn:
        query_lens, seq_lens, kv_slots = batch.query_lens, batch.seq_lens, batch.kv_slots

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            keys = gather_kv(key_cache, kv_slots).transpose(0, 1)  # [kv_heads, S, head_dim]
            values = gather_kv(value_cache, kv_slots).transpose(0, 1)
            q = q.transpose(0, 1)  # [heads, N, head_dim]
            outs = [
                F.scaled_dot_product_attention(q_i, k_i, v_i, enable_gqa=True)
                for q_i, k_i, v_i in zip(
                    q.split(query_lens, dim=1), keys.split(seq_lens, dim=1), values.split(seq_lens, dim=1)
                )
            ]
            return torch.cat(outs, dim=1).transpose(0, 1)

        return attend
