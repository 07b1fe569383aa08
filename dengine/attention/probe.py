"""Attention probabilities of chosen query rows: a side computation next to the fused attention kernels."""

from __future__ import annotations

import torch


class AttentionProbe:
    """Per layer, the head-averaged attention probabilities [rows, canvas] of some sequences' query rows.

    d2Cache's attention rollout needs them and fused kernels never return them, so they are recomputed
    from the same rotated queries and cached keys (fp32 scores and softmax), for those sequences' rows
    only: every other sequence keeps the fused path untouched.
    """

    def __init__(self, targets: list[tuple[int, int, torch.Tensor]]) -> None:
        # Per recorded sequence: (its first batch row, its number of rows, its canvas's key slots).
        self.targets = targets
        self.records: list[list[torch.Tensor]] = [[] for _ in targets]

    def record(self, q: torch.Tensor, key_cache: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Store one layer's probabilities; q [n, heads, head_dim] holds the batch rows listed in rows
        (sorted; None: every row), key_cache holds the layer's keys after this step's writes."""
        heads, head_dim = q.shape[1:]
        kv_heads = key_cache.shape[-2]
        group = heads // kv_heads
        flat_k = key_cache.view(-1, kv_heads, head_dim)
        for (start, count, slots), record in zip(self.targets, self.records):
            if rows is None:
                queries = q[start : start + count]
            else:
                wanted = torch.arange(start, start + count, device=q.device)
                queries = q.index_select(0, torch.searchsorted(rows, wanted))
            # [kv_heads, group * count, head_dim]: the query heads sharing a KV head stacked, as in attention
            queries = queries.float().view(count, kv_heads, group, head_dim).permute(1, 2, 0, 3)
            keys = flat_k.index_select(0, slots).float().transpose(0, 1)  # [kv_heads, T, head_dim]
            scores = torch.matmul(queries.reshape(kv_heads, group * count, head_dim), keys.transpose(1, 2))
            probs = (scores * head_dim**-0.5).softmax(-1)
            record.append(probs.view(kv_heads * group, count, -1).mean(0))
