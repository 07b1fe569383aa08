"""Portable backend: plain torch attention, on every device; the CPU default.

Sequences with the same (query count, canvas length) go through one batched call of torch's
scaled_dot_product_attention: in a batch of equal prompts every partial step is one call, not one per
sequence, and nothing is ever padded. On CPU a sequence alone in its group, and every full recompute, is
written out instead (two matmuls around an fp32 softmax), reading its keys in place when its blocks are
adjacent: SDPA's CPU kernel costs more than the written-out attention once a sequence's scores are large
(16 full recomputes of 179 positions, 8 heads of 32, bf16, one thread: SDPA 10.4 ms per layer, written out
per sequence 6.4 ms; 16 partial steps of 18 rows: 1.5 and 1.6 ms). GQA folds each KV head's query heads
into one matmul.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F

from dengine.attention.base import AttendFn, AttentionBackend
from dengine.forward_batch import ForwardBatch


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in fp32 (fp64 for fp64 inputs) of q [..., heads, n, d] over k [..., kv_heads,
    s, d], laid out [..., kv_heads, (heads // kv_heads) * n, s]: the query heads sharing a KV head stacked (GQA,
    one matmul). fp64 stays fp64 so that a sequence alone computes what SDPA computes for it in a batch."""
    *lead, heads, n, d = q.shape
    kv_heads = k.shape[-3]
    grouped = q.reshape(*lead, kv_heads, (heads // kv_heads) * n, d)
    # k contiguous first: the matmul over the cache's [s, kv_heads, d] layout is two to three times slower
    scores = torch.matmul(grouped, k.contiguous().transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
    return scores.mul_(d**-0.5).softmax(-1)  # scores is the matmul's own output or its fp32 copy: scale in place


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of q [..., heads, n, d] over k, v [..., kv_heads, s, d]; softmax in fp32."""
    out = torch.matmul(attention_probs(q, k).to(v.dtype), v)
    return out.reshape(q.shape)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class TorchAttentionBackend(AttentionBackend):
    """Runs on every device; the default on CPU."""

    name = "torch"

    def plan(self, batch: ForwardBatch) -> AttendFn:
        # Group the sequences by shape (query len, canvas len). On CPU a group of one and a group of full
        # recomputes are written out per sequence: (first row, query len, canvas len, key reader) each. The
        # other groups go through one SDPA call each: (count, query len, canvas len, query rows, key slots);
        # a single group covers every row and key in order, with nothing to gather or scatter.
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, shape in enumerate(zip(batch.query_lens, batch.seq_lens)):
            members[shape].append(index)
        q_starts, k_starts = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
        device, alone, together = batch.input_ids.device, [], []
        for (q_len, s_len), indices in members.items():
            if device.type == "cpu" and (len(indices) == 1 or q_len == s_len):
                alone += [(q_starts[i], q_len, s_len, _keys(batch.kv_slots[k_starts[i] : k_starts[i] + s_len]))
                          for i in indices]
            elif len(members) == 1:
                together.append((len(indices), q_len, s_len, None, batch.kv_slots))
            else:
                rows = torch.cat([torch.arange(q_starts[i], q_starts[i] + q_len) for i in indices]).to(device)
                keys = torch.cat([torch.arange(k_starts[i], k_starts[i] + s_len) for i in indices]).to(device)
                together.append((len(indices), q_len, s_len, rows, batch.kv_slots.index_select(0, keys)))
        single = len(alone) + len(together) == 1

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            heads, head_dim = q.shape[1:]
            kv_heads = key_cache.shape[-2]
            flat_k = key_cache.view(-1, kv_heads, head_dim)
            flat_v = value_cache.view(-1, kv_heads, head_dim)
            out = None if single else torch.empty_like(q)
            for start, q_len, s_len, keys in alone:
                qs = q[start : start + q_len].view(1, q_len, heads, head_dim).transpose(1, 2)
                ks = keys(flat_k).view(1, s_len, kv_heads, head_dim).transpose(1, 2)
                vs = keys(flat_v).view(1, s_len, kv_heads, head_dim).transpose(1, 2)
                os = math_attention(qs, ks, vs).transpose(1, 2).reshape(q_len, heads, head_dim)
                if out is None:
                    return os
                out[start : start + q_len] = os
            for count, q_len, s_len, rows, slots in together:
                qg = (q if rows is None else q.index_select(0, rows)).view(count, q_len, heads, head_dim)
                kg = flat_k.index_select(0, slots).view(count, s_len, kv_heads, head_dim)
                vg = flat_v.index_select(0, slots).view(count, s_len, kv_heads, head_dim)
                og = _sdpa(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)).transpose(1, 2)
                og = og.reshape(count * q_len, heads, head_dim)
                if out is None:
                    return og
                out.index_copy_(0, rows, og)
            return out

        return attend


def _keys(slots: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reads the rows at slots of a flat cache: a view when they are one ascending run (a sequence whose
    blocks are adjacent), else a gather."""
    first, count = int(slots[0]), slots.numel()
    if int(slots[-1]) - first == count - 1 and bool((slots.diff() == 1).all()):
        return lambda flat: flat.narrow(0, first, count)
    return lambda flat: flat.index_select(0, slots)
