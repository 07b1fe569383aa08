"""Per-layer row selection for sequences that reuse cached layer outputs (dLLM-Cache), inside the one forward.

Layer 0 recomputes every row. From layer 1 on a row is recomputed when its sequence does not reuse outputs,
when it is in its sequence's `always` set, or when it is among the `count` candidates of its sequence whose
newly computed V is least similar (cosine, over all KV heads) to its cached V; every other row adds its
cached attention and FFN outputs to the residual stream instead. V of every candidate is overwritten; a
reusing sequence stores every attention and FFN output it computes, in the blocks of its output table.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def true_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of mask's count True entries, ascending: nonzero() without its device sync, the count being
    known on the host (a stable sort puts the True entries first, in order)."""
    return (~mask).to(torch.uint8).argsort(stable=True)[:count]


@dataclass
class LayerReuse:
    """Built by the runner per step on the host, sent to the device with the batch; read by every decoder layer.
    Every row count a layer needs follows from these tensors' shapes, so selecting rows never waits for the
    device."""

    reusing: torch.Tensor  # [N] bool: the row belongs to a sequence that reuses outputs
    reusing_rows: torch.Tensor  # those rows, ascending
    fixed_rows: torch.Tensor  # recomputed at every layer, ascending: every row of the other sequences, and `always`
    output_blocks: torch.Tensor  # [N] pool block of each reusing row's outputs
    output_offsets: torch.Tensor  # [N] its slot in that block
    candidate_rows: torch.Tensor  # each reusing sequence's candidate rows, sequence after sequence
    candidate_slots: torch.Tensor  # K/V slot of each candidate row
    candidates: list[tuple[int, int]]  # per sequence in candidate_rows: (its candidate rows, how many to recompute)
    attend_rows: AttendFn | None = None  # attention planned for the rows recomputed past layer 0; None: all

    def select(
        self, layer: int, h: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor], kv_cache: PagedKVCache
    ) -> LayerRows:
        """This layer's rows; values(h_rows) gives the new V [n, kv_heads, head_dim] of some rows."""
        if layer == 0 or self.attend_rows is None:
            return LayerRows(None, None, self.reusing_rows, self.reusing_rows)
        chosen = [self.fixed_rows]
        if self.candidate_rows.numel():
            new = values(h.index_select(0, self.candidate_rows))
            cached = kv_cache.value[layer].view(-1, *new.shape[1:])
            old = cached.index_select(0, self.candidate_slots)
            cached.index_copy_(0, self.candidate_slots, new)
            start = 0
            for size, count in self.candidates:
                segment = slice(start, start + size)
                chosen.append(self.candidate_rows[segment][least_similar(new[segment], old[segment], count)])
                start += size
        active = torch.cat(chosen).sort().values
        recomputed = torch.zeros_like(self.reusing).index_fill_(0, active, True)
        passive = true_rows(~recomputed, recomputed.numel() - active.numel())
        # Every row of an ordinary sequence is active; every other active row stores its outputs.
        ordinary = self.reusing.numel() - self.reusing_rows.numel()
        stored = true_rows(self.reusing.index_select(0, active), active.numel() - ordinary)
        return LayerRows(active, passive, stored, active[stored])

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
