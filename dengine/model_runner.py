"""Turns per-sequence query sets into one ragged ForwardBatch and runs the model on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dengine.attention import AttentionBackend, select_backend
from dengine.forward_batch import ForwardBatch
from dengine.kv.kv_cache import PagedKVCache
from dengine.models.transformer import DiffusionLM


@dataclass
class SequenceQuery:
    """One sequence's share of a step: compute query_positions, return logits at logits_positions."""

    token_ids: torch.Tensor  # [T] the whole canvas (CPU, int64)
    block_table: Sequence[int]
    query_positions: torch.Tensor  # [n] distinct canvas indices whose K/V are recomputed
    logits_positions: torch.Tensor | None = None  # subset of query_positions; None means all of them

    @property
    def num_logits(self) -> int:
        chosen = self.query_positions if self.logits_positions is None else self.logits_positions
        return int(chosen.numel())


def _positions_tensor(values: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


class ModelRunner:
    """Owns the model, its paged KV cache and the attention backend; one forward per call."""

    def __init__(
        self,
        model: DiffusionLM,
        kv_cache: PagedKVCache,
        backend: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = next(model.parameters()).device
        self.backend = backend or select_backend(self.device)

    def prepare(self, queries: Sequence[SequenceQuery]) -> ForwardBatch:
        """Validate the query sets and flatten them (ids, positions, slots, lengths) on the device."""
        if not queries:
            raise ValueError("a forward step needs at least one sequence")
        bs = self.kv_cache.block_size
        ids, positions, slots, kv_slots, logit_rows, tables = [], [], [], [], [], []
        query_lens, seq_lens = [], []
        row_offset = 0
        for index, query in enumerate(queries):
            canvas = torch.as_tensor(query.token_ids, dtype=torch.long).reshape(-1)
            length = canvas.numel()
            table = torch.as_tensor(list(query.block_table), dtype=torch.long)
            if table.numel() * bs < length:
                raise ValueError(
                    f"sequence {index}: block table of {table.numel()} blocks cannot hold {length} tokens"
                )
            if table.numel() and not 0 <= int(table.min()) <= int(table.max()) < self.kv_cache.num_blocks:
                raise ValueError(f"sequence {index}: block table refers to blocks outside the pool")
            pos = _positions_tensor(query.query_positions)
            if pos.numel() == 0 or int(pos.min()) < 0 or int(pos.max()) >= length:
                raise ValueError(f"sequence {index}: query positions must be non-empty and within [0, {length})")
            row_of = torch.full((length,), -1, dtype=torch.long)
            row_of[pos] = torch.arange(pos.numel())
            if int((row_of >= 0).sum()) != pos.numel():
                raise ValueError(f"sequence {index}: query positions contain duplicates")
            wanted = pos if query.logits_positions is None else _positions_tensor(query.logits_positions)
            rows = row_of[wanted]
            if bool((rows < 0).any()):
                raise ValueError(f"sequence {index}: logits requested at positions that are not computed")
            every_position = torch.arange(length)
            ids.append(canvas[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            kv_slots.append(table[every_position // bs] * bs + every_position % bs)
            logit_rows.append(rows + row_offset)
            tables.append(table)
            query_lens.append(pos.numel())
            seq_lens.append(length)
            row_offset += pos.numel()

        block_tables = torch.zeros((len(tables), max(t.numel() for t in tables)), dtype=torch.int32)
        for i, table in enumerate(tables):
            block_tables[i, : table.numel()] = table
        to_device = {"device": self.device, "non_blocking": True}
        batch = ForwardBatch(
            input_ids=torch.cat(ids).to(**to_device),
            positions=torch.cat(positions).to(**to_device),
            slot_mapping=torch.cat(slots).to(**to_device),
            logits_indices=torch.cat(logit_rows).to(**to_device),
            query_lens=query_lens,
            seq_lens=seq_lens,
            cu_seqlens_q=_cumulative(query_lens).to(**to_device),
            cu_seqlens_k=_cumulative(seq_lens).to(**to_device),
            block_tables=block_tables.to(**to_device),
            kv_slots=torch.cat(kv_slots).to(**to_device),
            block_size=bs,
        )
        batch.attend = self.backend.plan(batch)
        return batch

    @torch.inference_mode()
    def run(self, queries: Sequence[SequenceQuery]) -> list[torch.Tensor]:
        """One forward over the ragged batch; per sequence, logits [num_logits, vocab] in request order."""
        batch = self.prepare(queries)
        logits = self.model(batch, self.kv_cache)
        return list(logits.split([q.num_logits for q in queries]))


def _cumulative(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0)
    return out
