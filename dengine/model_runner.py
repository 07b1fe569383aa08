"""Turns per-sequence query sets into one ragged ForwardBatch and runs the model on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from dengine.attention import AttentionBackend, select_backend
from dengine.attention.probe import AttentionProbe
from dengine.forward_batch import ForwardBatch, records_to_device, to_host
from dengine.forward_context import ForwardContext
from dengine.kv.kv_cache import PagedKVCache
from dengine.layer_reuse import LayerReuse
from dengine.models.transformer import DiffusionLM


@dataclass
class CachedOutputs:
    """dLLM-Cache's share of a query: past layer 0 its rows reuse their cached attention and FFN outputs,
    except `always` and, per layer, the `count` candidates whose new V differs most from the cached V."""

    output_table: Sequence[int]  # pool blocks holding the sequence's per-layer outputs
    always: torch.Tensor  # canvas positions recomputed at every layer (a subset of query_positions)
    candidates: torch.Tensor  # canvas positions competing for the recomputed rows (a subset too, disjoint)
    count: int


@dataclass
class SequenceQuery:
    """One sequence's share of a step: compute query_positions, return logits at logits_positions."""

    token_ids: torch.Tensor  # [T] the whole canvas (CPU, int64)
    block_table: Sequence[int]
    query_positions: torch.Tensor  # [n] distinct canvas indices whose K/V are recomputed
    logits_positions: torch.Tensor | None = None  # subset of query_positions; None means all of them
    cached_outputs: CachedOutputs | None = None
    record_attention: bool = False
    # Filled by the runner when record_attention: per layer, the head-averaged attention probabilities
    # [len(query_positions), T] of the query rows, in query_positions order.
    attention: list[torch.Tensor] | None = None

    @property
    def is_full(self) -> bool:
        """A full recompute: every position, every layer."""
        n = int(self.query_positions.numel())
        reuses = self.cached_outputs is not None and self.cached_outputs.always.numel() < n
        return n == self.token_ids.numel() and not reuses

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
        self._key_slots: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
        self._in_use: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}  # this step's, kept for the next

    def key_slots(self, block_table: Sequence[int], length: int) -> torch.Tensor:
        """The flat cache slot of every position of a canvas of length tokens; validated and built once per
        block table (a sequence's table never changes while it runs)."""
        key = (tuple(block_table), length)
        slots = self._key_slots.get(key)
        if slots is None:
            bs = self.kv_cache.block_size
            table = torch.as_tensor(key[0], dtype=torch.long)
            if table.numel() * bs < length:
                raise ValueError(f"a block table of {table.numel()} blocks cannot hold {length} tokens")
            if table.numel() and not 0 <= int(table.min()) <= int(table.max()) < self.kv_cache.num_blocks:
                raise ValueError("a block table refers to blocks outside the pool")
            every_position = torch.arange(length)
            slots = table[every_position // bs] * bs + every_position % bs
        self._in_use[key] = slots
        return slots

    def prepare(self, queries: Sequence[SequenceQuery]) -> ForwardContext:
        """Validate the query sets, flatten them (ids, positions, slots, lengths) on the host and send them to
        the device in one copy; planning reads the host's copy, so nothing here waits for the device."""
        if not queries:
            raise ValueError("a forward step needs at least one sequence")
        host, slots, row_maps = self._flatten(queries)
        reuse = rows = None
        if any(q.cached_outputs is not None for q in queries):
            reuse, rows = self._layer_reuse(host, queries, slots, row_maps)
        batch, reuse, rows_on_device = records_to_device([host, reuse, rows], self.device)
        batch = replace(batch, host=host)
        ctx = ForwardContext(batch, self.backend.plan(batch), layer_reuse=reuse)
        if rows is not None:
            reuse.attend_rows = self.backend.plan(replace(rows_on_device, host=rows))
        recorded = [i for i, q in enumerate(queries) if q.record_attention]
        if recorded:
            q_starts, k_starts = host.cu_seqlens_q.tolist(), host.cu_seqlens_k.tolist()
            ctx.probe = AttentionProbe([(q_starts[i], host.query_lens[i], batch.kv_slots[k_starts[i] : k_starts[i + 1]])
                                        for i in recorded])
        return ctx

    def _flatten(
        self, queries: Sequence[SequenceQuery]
    ) -> tuple[ForwardBatch, list[torch.Tensor], list[torch.Tensor]]:
        """The step's ForwardBatch on the host, each query's slots and its row (from 0) of each canvas position
        (-1 where it is not computed)."""
        self._in_use = {}
        ids, positions, slots, kv_slots, logit_rows, row_maps = [], [], [], [], [], []
        query_lens, seq_lens = [], []
        row_offset = 0
        for index, query in enumerate(queries):
            canvas = torch.as_tensor(query.token_ids, dtype=torch.long).reshape(-1)
            length = canvas.numel()
            try:
                seq_slots = self.key_slots(query.block_table, length)
            except ValueError as exc:
                raise ValueError(f"sequence {index}: {exc}") from None
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
            ids.append(canvas[pos])
            positions.append(pos)
            slots.append(seq_slots[pos])
            kv_slots.append(seq_slots)
            logit_rows.append(rows + row_offset)
            row_maps.append(row_of)
            query_lens.append(pos.numel())
            seq_lens.append(length)
            row_offset += pos.numel()
        # Keep the key slots of the tables in use: the cache never outgrows the running sequences.
        self._key_slots, self._in_use = self._in_use, {}

        width = max(len(q.block_table) for q in queries)
        block_tables = torch.tensor([[*q.block_table, *[0] * (width - len(q.block_table))] for q in queries],
                                    dtype=torch.int32)
        batch = ForwardBatch(
            input_ids=torch.cat(ids),
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slots),
            logits_indices=torch.cat(logit_rows),
            query_lens=query_lens,
            seq_lens=seq_lens,
            cu_seqlens_q=_cumulative(query_lens),
            cu_seqlens_k=_cumulative(seq_lens),
            block_tables=block_tables,
            kv_slots=torch.cat(kv_slots),
            block_size=self.kv_cache.block_size,
        )
        return batch, slots, row_maps

    def _layer_reuse(
        self,
        batch: ForwardBatch,
        queries: Sequence[SequenceQuery],
        slots: list[torch.Tensor],
        row_maps: list[torch.Tensor],
    ) -> tuple[LayerReuse, ForwardBatch | None]:
        """On the host, the per-layer row selection of a batch in which some sequences reuse cached layer
        outputs, and the batch of the rows recomputed past layer 0 when attention must be planned for them;
        row_maps[i] gives query i's row (from 0) of each canvas position, -1 where it is not computed."""
        n = batch.input_ids.numel()
        reusing = torch.zeros(n, dtype=torch.bool)
        fixed = torch.ones(n, dtype=torch.bool)
        blocks, offsets = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        candidate_rows, candidate_slots, candidates, partial_lens = [], [], [], []
        per_block = self.kv_cache.outputs_per_block
        for query, start, row_slots, row_map in zip(queries, batch.cu_seqlens_q.tolist(), slots, row_maps):
            spec = query.cached_outputs
            pos = _positions_tensor(query.query_positions)
            if spec is None:
                partial_lens.append(pos.numel())
                continue
            rows = slice(start, start + pos.numel())
            always, competing = row_map[_positions_tensor(spec.always)], row_map[_positions_tensor(spec.candidates)]
            if bool((always < 0).any()) or bool((competing < 0).any()):
                raise ValueError("cached_outputs lists positions that are not computed")
            if torch.cat([always, competing]).unique().numel() != always.numel() + competing.numel():
                raise ValueError("cached_outputs lists a position twice (always and candidates are disjoint sets)")
            always, competing = always + start, competing + start
            reusing[rows] = True
            fixed[rows] = False
            fixed[always] = True
            table = torch.as_tensor(list(spec.output_table), dtype=torch.long)
            if table.numel() * per_block < query.token_ids.numel():
                raise ValueError(f"an output table of {table.numel()} blocks cannot hold {query.token_ids.numel()} "
                                 f"tokens' layer outputs ({per_block} per block)")
            blocks[rows], offsets[rows] = table[pos // per_block], pos % per_block
            count = min(spec.count, competing.numel())
            if competing.numel():
                candidate_rows.append(competing)
                candidate_slots.append(row_slots[competing - start])
                candidates.append((competing.numel(), count))
            partial_lens.append(always.numel() + count)
        no_rows = torch.zeros(0, dtype=torch.long)
        reuse = LayerReuse(
            reusing,
            reusing.nonzero().flatten(),
            fixed.nonzero().flatten(),
            blocks,
            offsets,
            torch.cat(candidate_rows or [no_rows]),
            torch.cat(candidate_slots or [no_rows]),
            candidates,
        )
        if partial_lens == batch.query_lens:
            return reuse, None  # attend_rows None: every row is recomputed at every layer
        if not any(partial_lens):
            reuse.attend_rows = _no_rows
            return reuse, None
        return reuse, self._rows_batch(batch, partial_lens)

    def _rows_batch(self, batch: ForwardBatch, query_lens: list[int]) -> ForwardBatch:
        """batch (on the host) with each sequence computing query_lens[i] rows; sequences computing none are
        left out."""
        keep = [i for i, count in enumerate(query_lens) if count]
        k_starts = batch.cu_seqlens_k.tolist()
        seq_lens = [batch.seq_lens[i] for i in keep]
        kept_lens = [query_lens[i] for i in keep]
        return replace(
            batch,
            query_lens=kept_lens,
            seq_lens=seq_lens,
            cu_seqlens_q=_cumulative(kept_lens),
            cu_seqlens_k=_cumulative(seq_lens),
            block_tables=batch.block_tables[keep],
            kv_slots=torch.cat([batch.kv_slots[k_starts[i] : k_starts[i + 1]] for i in keep]),
        )

    @torch.inference_mode()
    def run(self, queries: Sequence[SequenceQuery]) -> list[torch.Tensor]:
        """One forward over the ragged batch; per sequence, logits [num_logits, vocab] in request order, on the
        host (with the attention of the sequences that record it), in one copy."""
        ctx = self.prepare(queries)
        logits = self.model(ctx, self.kv_cache)
        records = [] if ctx.probe is None else ctx.probe.records
        logits, *attention = to_host([logits, *(layer for layers in records for layer in layers)])
        on_host = iter(attention)
        for query, layers in zip([q for q in queries if q.record_attention], records):
            query.attention = [next(on_host) for _ in layers]
        return list(logits.split([q.num_logits for q in queries]))


def _no_rows(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
    """Attention of a layer that recomputes no row: nothing."""
    return q


def _cumulative(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0)
    return out
