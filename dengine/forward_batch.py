"""The flat, ragged description of one forward step: what every layer and attention backend reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Query rows of several sequences, concatenated sequence after sequence.

    Each sequence i contributes query_lens[i] rows (its computed positions) and attends to all
    seq_lens[i] positions of its own canvas, read from the paged cache through its block table.
    """

    input_ids: torch.Tensor  # [N] token at each computed position
    positions: torch.Tensor  # [N] canvas index of each computed position (RoPE)
    slot_mapping: torch.Tensor  # [N] flat cache slot the row's K/V are written to
    logits_indices: torch.Tensor  # [M] rows whose logits are returned, in this order
    query_lens: list[int]
    seq_lens: list[int]
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    block_tables: torch.Tensor  # [B, max blocks] int32, rows padded with 0 past a sequence's blocks
    kv_slots: torch.Tensor  # [sum(seq_lens)] flat slot of every key position, sequence after sequence
    block_size: int

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)
