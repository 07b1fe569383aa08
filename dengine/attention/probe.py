"""Attention probabilities of chosen query rows: a side computation next to the fused attention kernels."""

from __future__ import annotations

import torch


class AttentionProbe:
    """Per layer, the head-averaged attention probabilities [rows, canvas] of some sequences' query rows.

    d2Cache's attention rollout needs them and fused kernels never return them, so they are recomputed
    from the same rotated queries and cached keys, for those sequences' rows only: every other sequence
    keeps the fused path untouched.
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
        flat_k = key_cache.view(-1, kv_heads, head_dim)
        for (start, count, slots), record in zip(self.targets, self.records):
            wanted = torch.arange(start, start + count, device=q.device)
            if rows is not None:
                wanted = torch.searchsorted(rows, wanted)
            queries = q.index_select(0, wanted).view(count, kv_heads, heads // kv_heads, head_dim)
            keys = flat_k.index_select(0, slots)
            scores = torch.einsum("ngsd,tgd->gsnt", queries.float(), keys.float()) * head_dim**-0.5
            record.append(scores.softmax(-1).mean(dim=(0, 1)))
