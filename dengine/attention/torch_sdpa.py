"""Portable backend: one attention call per sequence (no padding), on every device.

On CUDA each sequence goes through torch's scaled_dot_product_attention. On CPU the attention is written
out (two batched matmuls around an fp32 softmax): for the few dozen query rows of a partial step, SDPA's
fixed per-call cost is about twice the whole computation, and partial steps are what the cache policies
make common. GQA folds each KV head's query heads into one matmul instead of repeating K and V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dengine.attention.base import AttentionBackend, gather_kv
from dengine.forward_batch import AttendFn, ForwardBatch


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of q [heads, n, d] over k, v [kv_heads, s, d]; softmax in fp32."""
    heads, n, d = q.shape
    kv_heads = k.shape[0]
    grouped = q.reshape(kv_heads, (heads // kv_heads) * n, d)  # query heads of one KV head, stacked
    scores = torch.matmul(grouped, k.transpose(1, 2)).float() * d**-0.5
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.reshape(heads, n, d)


class TorchAttentionBackend(AttentionBackend):
    """Runs on every device; the default on CPU."""

    name = "torch"

    def plan(self, batch: ForwardBatch) -> AttendFn:
        query_lens, seq_lens, kv_slots = batch.query_lens, batch.seq_lens, batch.kv_slots

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            keys = gather_kv(key_cache, kv_slots).transpose(0, 1)  # [kv_heads, S, head_dim]
            values = gather_kv(value_cache, kv_slots).transpose(0, 1)
            q = q.transpose(0, 1)  # [heads, N, head_dim]
            if q.is_cuda:
                def one(q_i, k_i, v_i):
                    return F.scaled_dot_product_attention(q_i, k_i, v_i, enable_gqa=True)
            else:
                one = math_attention
            outs = [
                one(q_i, k_i, v_i)
                for q_i, k_i, v_i in zip(
                    q.split(query_lens, dim=1), keys.split(seq_lens, dim=1), values.split(seq_lens, dim=1)
                )
            ]
            return torch.cat(outs, dim=1).transpose(0, 1)

        return attend
