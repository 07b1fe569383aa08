"""Per-sequence block tables over a BlockPool: the KV interface the scheduler sees."""

from __future__ import annotations

from collections.abc import Hashable

from dengine.kv.block_pool import BlockPool


class RequestTooLargeError(ValueError):
    """A sequence needs more blocks than the whole pool holds: it can never be scheduled."""


class KVCacheManager:
    """Reserves a sequence's whole canvas at admission (a diffusion canvas never grows)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence could ever hold."""
        return self.pool.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, num_tokens: int, copies: int = 1) -> None:
        """Raise RequestTooLargeError if copies canvases of num_tokens could not fit even in an empty pool."""
        needed = copies * self.blocks_needed(num_tokens)
        if needed > self.pool.num_blocks:
            what = f"{copies} canvases of {num_tokens} tokens" if copies > 1 else f"a canvas of {num_tokens} tokens"
            raise RequestTooLargeError(
                f"{what} needs {needed} KV blocks of {self.block_size} tokens but the whole pool has "
                f"{self.pool.num_blocks} ({self.capacity_tokens} tokens); raise kv_cache_memory or shorten the request"
            )

    def can_allocate(self, num_tokens: int, copies: int = 1) -> bool:
        return copies * self.blocks_needed(num_tokens) <= self.pool.num_free_blocks

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Reserve blocks for a canvas of num_tokens and return the sequence's block table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds KV blocks")
        self.check_fits(num_tokens)
        table = self.pool.allocate(self.blocks_needed(num_tokens))
        self._tables[seq_id] = table
        return table

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables[seq_id]

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks; unknown ids are ignored so aborts are idempotent."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self.pool.free(table)

    def num_sequences(self) -> int:
        return len(self._tables)
