"""A fixed set of KV blocks and the free list they are handed out from (most recently freed first)."""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks right now; the request may fit once others finish."""


class BlockPool:
    """Hands out block ids 0..num_blocks-1; knows nothing about sequences or models."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use = [False] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take count blocks from the free list, all or none."""
        if count > len(self._free):
            raise NoFreeBlocksError(f"{count} blocks requested, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._in_use[block] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list; freeing a block twice is a bug and raises."""
        for block in blocks:
            if not self._in_use[block]:
                raise ValueError(f"block {block} is already free")
        for block in reversed(blocks):
            self._in_use[block] = False
            self._free.appendleft(block)  # reused first: a CPU pool's resident pages stay those of the peak load
