"""Attention probabilities of chosen query rows: a side computation next to the fused attention kernels."""

from __future__ import annotations

import torch

from dengine.attention.torch_sdpa import attention_probs


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
        flat_k = key_cache.view(-1, *key_cache.shape[-2:])
        for (start, count, slots), record in zip(self.targets, self.records):
            if rows is None:
                queries = q[start : start + count]
            else:
                wanted = torch.arange(start, start + count, device=q.device)
                queries = q.index_select(0, torch.searchsorted(rows, wanted))
            keys = flat_k.index_select(0, slots)
            probs = attention_probs(queries.float().transpose(0, 1), keys.float().transpose(0, 1))
            record.append(probs.view(heads, count, -1).mean(0))
