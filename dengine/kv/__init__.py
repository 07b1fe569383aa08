"""Paged KV storage: the block pool, the per-layer cache tensors and per-sequence block tables."""

from dengine.kv.block_pool import BlockPool, NoFreeBlocksError
from dengine.kv.kv_cache import (
    KVPoolPlan,
    PagedKVCache,
    available_memory_bytes,
    plan_kv_pool,
    resolve_memory_budget,
    total_memory_bytes,
)
from dengine.kv.manager import KVCacheManager, RequestTooLargeError

__all__ = [
    "BlockPool",
    "KVCacheManager",
    "KVPoolPlan",
    "NoFreeBlocksError",
    "PagedKVCache",
    "RequestTooLargeError",
    "available_memory_bytes",
    "total_memory_bytes",
    "plan_kv_pool",
    "resolve_memory_budget",
]
