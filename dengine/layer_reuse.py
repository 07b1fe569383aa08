"""Per-layer row selection for sequences that reuse cached layer outputs (dLLM-Cache), inside the one forward.

Layer 0 recomputes every row. From layer 1 on a row is recomputed when its sequence does not reuse outputs,
when it is in its sequence's `always` set, or when it is among the `count` candidates of its sequence whose
newly computed V is least similar (cosine, over all KV heads) to its cached V; every other row adds its
cached attention and FFN outputs to the residual stream instead. V of every candidate is overwritten; a
reusing sequence stores every attention and FFN output it computes, in the blocks of its output table.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from dengine.attention.base import AttendFn
from dengine.kv.kv_cache import PagedKVCache


def least_similar(new: torch.Tensor, old: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the count rows whose new value is least similar (cosine over all heads) to the old one."""
    similarity = F.cosine_similarity(new.flatten(1).float(), old.flatten(1).float(), dim=-1)
    return similarity.topk(min(count, similarity.numel()), largest=False).indices


class LayerRows(NamedTuple):
    """The rows one layer recomputes; None for active and passive when it recomputes every row."""

    active: torch.Tensor | None  # sorted batch rows
    passive: torch.Tensor | None  # the other rows: they read their outputs from the cache
    stored: torch.Tensor  # indices into the computed rows whose outputs are stored
    stored_rows: torch.Tensor  # the batch rows those are


class LayerReuse:
    """Built by the runner per step; read by every decoder layer."""

    def __init__(
        self,
        reusing: torch.Tensor,
        fixed: torch.Tensor,
        output_blocks: torch.Tensor,
        output_offsets: torch.Tensor,
        candidates: list[tuple[torch.Tensor, int]],
        candidate_slots: torch.Tensor,
        attend_rows: AttendFn | None,
    ) -> None:
        self.reusing = reusing  # [N] bool: the row belongs to a sequence that reuses outputs
        self.reusing_rows = reusing.nonzero().flatten()
        self.fixed_rows = fixed.nonzero().flatten()  # recomputed at every layer
        self.output_blocks = output_blocks  # [N] pool block of each reusing row's outputs
        self.output_offsets = output_offsets  # [N] its slot in that block
        self.candidates = candidates  # per reusing sequence: (its candidate rows, how many to recompute)
        self.candidate_rows = torch.cat([rows for rows, _ in candidates] or [reusing.new_zeros(0, dtype=torch.long)])
        self.candidate_slots = candidate_slots  # K/V slot of each candidate row
        self.attend_rows = attend_rows  # attention planned for the rows recomputed past layer 0; None: all
        self._every_row = LayerRows(None, None, self.reusing_rows, self.reusing_rows)

    def select(
        self, layer: int, h: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor], kv_cache: PagedKVCache
    ) -> LayerRows:
        """This layer's rows; values(h_rows) gives the new V [n, kv_heads, head_dim] of some rows."""
        if layer == 0 or self.attend_rows is None:
            return self._every_row
        chosen = [self.fixed_rows]
        if self.candidate_rows.numel():
            new = values(h.index_select(0, self.candidate_rows))
            cached = kv_cache.value[layer].view(-1, *new.shape[1:])
            old = cached.index_select(0, self.candidate_slots)
            cached.index_copy_(0, self.candidate_slots, new)
            start = 0
            for rows, count in self.candidates:
                segment = slice(start, start + rows.numel())
                chosen.append(rows[least_similar(new[segment], old[segment], count)])
                start += rows.numel()
        active = torch.cat(chosen).sort().values
        recomputed = torch.zeros_like(self.reusing)
        recomputed[active] = True
        stored = self.reusing[active].nonzero().flatten()
        return LayerRows(active, (~recomputed).nonzero().flatten(), stored, active[stored])

    def merge(
        self, x: torch.Tensor, out: torch.Tensor, rows: LayerRows, layer: int, kind: int, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        """x plus each row's output (kind 0: attention, 1: FFN): computed where rows recomputes, else cached."""
        cache = kv_cache.layer_outputs(layer)[kind]
        if rows.stored_rows.numel():
            where = (self.output_blocks[rows.stored_rows], self.output_offsets[rows.stored_rows])
            cache.index_put_(where, out.index_select(0, rows.stored))
        if rows.active is None:
            return x + out
        full = torch.empty_like(x)
        full.index_copy_(0, rows.active, out)
        full.index_copy_(0, rows.passive, cache[self.output_blocks[rows.passive], self.output_offsets[rows.passive]])
        return x + full
