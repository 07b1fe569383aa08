"""Portable backend: plain torch attention, on every device; the CPU default.

Sequences with the same (query count, canvas length) are attended together: in a batch of equal prompts
every step is one group, and nothing is ever padded. On GPU a group is one call of torch's
scaled_dot_product_attention. On CPU it is written out (q k^T in fp32, an fp32 softmax, the probabilities in
the operands' dtype for the matmul with contiguous values, as SDPA's own CPU kernel keeps them), in chunks of
sequences whose fp32 scores stay within about a core's L2, and a lone sequence whose blocks are adjacent
reads its keys in place: torch's CPU SDPA kernel is slower
(measured on a shared 2-core machine, bf16, 8 heads of 32 over 179 positions, one thread: 16 full
recomputes 10.4 ms per layer against 6.4 ms written out per sequence; 16 partial steps of 18 rows 1.1 ms
against 0.56 ms batched). GQA folds each KV head's query heads into one matmul.
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
    wide = torch.promote_types(q.dtype, torch.float32)
    # one copy, contiguous in the wide dtype, which the GQA grouping then views
    grouped = q.to(wide, memory_format=torch.contiguous_format).reshape(*lead, kv_heads, (heads // kv_heads) * n, d)
    # The scores of bf16 / fp16 operands in fp32, as SDPA's and flash attention's kernels keep them: a bf16
    # matmul would round them to bf16 before the softmax, making the attention about 4x less accurate (mean
    # error 0.9% against 0.2% of the output's size). k contiguous: the matmul over the cache's [s, kv_heads, d]
    # layout is two to three times slower.
    scores = torch.matmul(grouped, k.to(wide, memory_format=torch.contiguous_format).transpose(-1, -2))
    return scores.mul_(d**-0.5).softmax(-1)  # scores is the matmul's own output: scale in place


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of q [..., heads, n, d] over k, v [..., kv_heads, s, d]; softmax in fp32."""
    out = torch.matmul(attention_probs(q, k).to(v.dtype), v.contiguous())
    return out.reshape(q.shape)


# CPU: the fp32 scores of one batched attention call stay under this many bytes (about a core's L2)
SCORES_BYTES = 2 << 20


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class TorchAttentionBackend(AttentionBackend):
    """Runs on every device; the default on CPU."""

    name = "torch"

    def plan(self, batch: ForwardBatch) -> AttendFn:
        # Group the sequences by shape: (count, query len, canvas len, query rows, key reader) per group.
        # One group (the common case) covers every row and key in order: nothing to gather or scatter.
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, shape in enumerate(zip(batch.query_lens, batch.seq_lens)):
            members[shape].append(index)
        # Offsets and slots are read on the host (batch.on_host): reading the device's would wait for it.
        host = batch.on_host
        if len(members) == 1:
            ((q_len, s_len), indices), = members.items()
            groups = [(len(indices), q_len, s_len, None, _keys(batch.kv_slots, host.kv_slots))]
        else:
            q_starts, k_starts = host.cu_seqlens_q.tolist(), host.cu_seqlens_k.tolist()
            device, groups = batch.input_ids.device, []
            for (q_len, s_len), indices in members.items():
                rows = torch.cat([torch.arange(q_starts[i], q_starts[i] + q_len, device=device) for i in indices])
                keys = [slice(k_starts[i], k_starts[i] + s_len) for i in indices]
                slots = [torch.cat([every[k] for k in keys]) for every in (batch.kv_slots, host.kv_slots)]
                groups.append((len(indices), q_len, s_len, rows, _keys(*slots)))
        attention = _sdpa if batch.input_ids.is_cuda else _chunked_math_attention

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            heads, head_dim = q.shape[1:]
            kv_heads = key_cache.shape[-2]
            flat_k = key_cache.view(-1, kv_heads, head_dim)
            flat_v = value_cache.view(-1, kv_heads, head_dim)
            out = None if len(groups) == 1 else torch.empty_like(q)
            for count, q_len, s_len, rows, keys in groups:
                qg = (q if rows is None else q.index_select(0, rows)).view(count, q_len, heads, head_dim)
                kg = keys(flat_k).view(count, s_len, kv_heads, head_dim)
                vg = keys(flat_v).view(count, s_len, kv_heads, head_dim)
                og = attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)).transpose(1, 2)
                og = og.reshape(count * q_len, heads, head_dim)
                if out is None:
                    return og
                out.index_copy_(0, rows, og)
            return out

        return attend


def _chunked_math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """math_attention over [count, heads, n, d] in chunks of sequences whose fp32 scores stay near the cache."""
    per_chunk = max(1, SCORES_BYTES // (q.shape[1] * q.shape[2] * k.shape[2] * 4))
    if per_chunk >= q.shape[0]:
        return math_attention(q, k, v)
    return torch.cat([math_attention(q[i : i + per_chunk], k[i : i + per_chunk], v[i : i + per_chunk])
                      for i in range(0, q.shape[0], per_chunk)])


def _keys(slots: torch.Tensor, host_slots: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reads the rows at slots (host_slots: the same on the host) of a flat cache: a view when they are one
    ascending run (a sequence whose blocks are adjacent), else a gather."""
    first, count = int(host_slots[0]), host_slots.numel()
    if int(host_slots[-1]) - first == count - 1 and bool((host_slots.diff() == 1).all()):
        return lambda flat: flat.narrow(0, first, count)
    return lambda flat: flat.index_select(0, slots)
