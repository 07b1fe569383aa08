"""The training forward: the model's own layers, with each layer's fresh K/V kept (differentiable) and
batched bidirectional attention over equal-length sequences instead of the paged cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dengine.forward_batch import ForwardBatch
from dengine.forward_context import ForwardContext


class TrainingKV:
    """Stands in for PagedKVCache: write keeps the layer's K/V, attention reads them back."""

    def __init__(self, num_layers: int) -> None:
        self.key: list[torch.Tensor | None] = [None] * num_layers
        self.value: list[torch.Tensor | None] = [None] * num_layers

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.key[layer], self.value[layer] = key, value


def dense_batch(input_ids: torch.Tensor, logits_indices: torch.Tensor) -> ForwardContext:
    """The forward context of B equal-length canvases [B, T], every position computed."""
    b, t = input_ids.shape
    device = input_ids.device
    flat = torch.arange(b * t, device=device)
    lengths = [t] * b
    cumulative = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=device)

    def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        heads, head_dim = q.shape[-2:]
        q4 = q.view(b, t, heads, head_dim).transpose(1, 2)
        k4 = keys.view(b, t, -1, head_dim).transpose(1, 2)
        v4 = values.view(b, t, -1, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * t, heads, head_dim)

    batch = ForwardBatch(
        input_ids=input_ids.reshape(-1),
        positions=torch.arange(t, device=device).repeat(b),
        slot_mapping=flat,
        logits_indices=logits_indices,
        query_lens=lengths,
        seq_lens=lengths,
        cu_seqlens_q=cumulative,
        cu_seqlens_k=cumulative,
        block_tables=torch.arange(b, dtype=torch.int32, device=device)[:, None],
        kv_slots=flat,
        block_size=t,
    )
    return ForwardContext(batch, attend)
