"""Per-sequence block tables over a BlockPool: the KV interface the scheduler sees."""

from __future__ import annotations

from collections.abc import Hashable

from dengine.kv.block_pool import BlockPool


class RequestTooLargeError(ValueError):
    """A sequence needs more blocks than the whole pool holds: it can never be scheduled."""


def canvas_blocks(num_tokens: int, block_size: int, outputs_per_block: int, layer_outputs: bool = False) -> int:
    """Blocks for a canvas of num_tokens: its K/V and, with layer_outputs (dLLM-Cache), its per-layer attention
    and FFN outputs, outputs_per_block tokens' worth a block."""
    blocks = -(-num_tokens // block_size)
    if layer_outputs:
        if outputs_per_block < 1:
            raise ValueError(
                f"a KV block of {block_size} tokens cannot hold one token's per-layer outputs "
                "(the model's hidden size exceeds block_size K/V elements); raise block_size"
            )
        blocks += -(-num_tokens // outputs_per_block)
    return blocks


class KVCacheManager:
    """Reserves a sequence's whole canvas at admission (a diffusion canvas never grows).

    A sequence whose policy caches per-layer outputs (dLLM-Cache) also reserves blocks of the same pool for
    them: outputs_per_block tokens' outputs fit in one block, so admission counts their memory with the K/V.
    """

    def __init__(self, num_blocks: int, block_size: int, outputs_per_block: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.outputs_per_block = outputs_per_block
        self.pool = BlockPool(num_blocks)
        self._tables: dict[Hashable, list[int]] = {}
        self._output_tables: dict[Hashable, list[int]] = {}

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

    def blocks_needed(self, num_tokens: int, layer_outputs: bool = False) -> int:
        """Blocks for a canvas's K/V and, with layer_outputs, for its per-layer attention and FFN outputs."""
        return canvas_blocks(num_tokens, self.block_size, self.outputs_per_block, layer_outputs)

    def check_fits(self, num_tokens: int, copies: int = 1, layer_outputs: bool = False) -> None:
        """Raise RequestTooLargeError if copies canvases of num_tokens could not fit even in an empty pool."""
        needed = copies * self.blocks_needed(num_tokens, layer_outputs)
        if needed > self.pool.num_blocks:
            what = f"{copies} canvases of {num_tokens} tokens" if copies > 1 else f"a canvas of {num_tokens} tokens"
            raise RequestTooLargeError(
                f"{what} needs {needed} KV blocks of {self.block_size} tokens but the whole pool has "
                f"{self.pool.num_blocks} ({self.capacity_tokens} tokens); raise kv_cache_memory or shorten the request"
            )

    def can_allocate(self, num_tokens: int, copies: int = 1, layer_outputs: bool = False) -> bool:
        return copies * self.blocks_needed(num_tokens, layer_outputs) <= self.pool.num_free_blocks

    def allocate(self, seq_id: Hashable, num_tokens: int, layer_outputs: bool = False) -> list[int]:
        """Reserve blocks for a canvas of num_tokens (and its layer outputs); return its K/V block table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds KV blocks")
        self.check_fits(num_tokens, layer_outputs=layer_outputs)
        kv_blocks = self.blocks_needed(num_tokens)
        blocks = self.pool.allocate(self.blocks_needed(num_tokens, layer_outputs))
        self._tables[seq_id] = blocks[:kv_blocks]
        if layer_outputs:
            self._output_tables[seq_id] = blocks[kv_blocks:]
        return blocks[:kv_blocks]

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables[seq_id]

    def output_table(self, seq_id: Hashable) -> list[int]:
        """The blocks holding a sequence's per-layer outputs; token t is slot t % outputs_per_block of block
        t // outputs_per_block."""
        return self._output_tables[seq_id]

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks; unknown ids are ignored so aborts are idempotent."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self.pool.free(table + self._output_tables.pop(seq_id, []))

    def num_sequences(self) -> int:
        return len(self._tables)
