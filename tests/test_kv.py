"""The block pool, per-sequence block tables and memory-budget sizing."""

from __future__ import annotations

import random

import pytest
import torch

from dengine.kv import (
    BlockPool,
    KVCacheManager,
    NoFreeBlocksError,
    PagedKVCache,
    RequestTooLargeError,
    resolve_memory_budget,
)
from dengine.models.loader import read_model_config
from checkpoints import REAL


def test_pool_allocates_all_or_nothing_and_tracks_usage():
    pool = BlockPool(10)
    first = pool.allocate(4)
    assert len(set(first)) == 4 and pool.num_free_blocks == 6 and pool.usage == pytest.approx(0.4)
    with pytest.raises(NoFreeBlocksError, match="7 blocks requested, 6 free"):
        pool.allocate(7)
    assert pool.num_free_blocks == 6
    second = pool.allocate(6)
    assert not set(first) & set(second) and pool.usage == 1.0
    pool.free(first)
    with pytest.raises(ValueError, match="already free"):
        pool.free([first[0]])
    assert pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_manager_reserves_whole_canvas_and_frees_on_finish(seed):
    rng = random.Random(seed)
    manager = KVCacheManager(num_blocks=20, block_size=8)
    held = {}
    for seq_id in range(30):
        tokens = rng.randint(1, 60)
        if manager.can_allocate(tokens):
            table = manager.allocate(seq_id, tokens)
            assert len(table) == -(-tokens // 8)
            held[seq_id] = table
        elif held:
            victim = rng.choice(list(held))
            manager.free(victim)
            del held[victim]
        in_use = [b for table in held.values() for b in table]
        assert len(in_use) == len(set(in_use)), "two sequences share a block"
        assert manager.num_free_blocks == 20 - len(in_use)
    for seq_id in list(held):
        manager.free(seq_id)
    manager.free(12345)  # unknown ids (an abort after finish) are ignored
    assert manager.num_free_blocks == 20 and manager.num_sequences() == 0


def test_manager_errors():
    manager = KVCacheManager(num_blocks=4, block_size=16)
    with pytest.raises(RequestTooLargeError, match="65 tokens needs 5 KV blocks .* whole pool has 4"):
        manager.allocate("too-big", 65)
    assert manager.num_free_blocks == 4
    manager.allocate("a", 64)
    with pytest.raises(NoFreeBlocksError):
        manager.allocate("b", 1)
    with pytest.raises(ValueError, match="already holds"):
        manager.allocate("a", 1)
    assert manager.capacity_tokens == 64


def test_budget_sizing_matches_the_real_models():
    _, llada = read_model_config(REAL["llada"])
    _, dream = read_model_config(REAL["dream"])
    # K and V, every layer, 16 tokens, all kv heads, bf16.
    assert PagedKVCache.bytes_per_block(llada, 16, torch.bfloat16) == 2 * 32 * 16 * 4096 * 2
    assert PagedKVCache.bytes_per_block(dream, 16, torch.bfloat16) == 2 * 28 * 16 * 4 * 128 * 2
    budget = 10 * PagedKVCache.bytes_per_block(dream, 16, torch.float32) + 5
    assert PagedKVCache.num_blocks_for_budget(dream, 16, torch.float32, budget) == 10
    with pytest.raises(ValueError, match="holds no KV block"):
        PagedKVCache.num_blocks_for_budget(llada, 16, torch.bfloat16, 1000)


def test_memory_budget_forms():
    cpu = torch.device("cpu")
    assert resolve_memory_budget(1 << 20, cpu) == 1 << 20
    assert 0 < resolve_memory_budget(0.01, cpu) < resolve_memory_budget(0.02, cpu)
    for bad in (0, -5, 0.0, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="kv_cache_memory"):
            resolve_memory_budget(bad, cpu)


def test_a_fraction_is_of_total_memory_whatever_is_free(monkeypatch, caplog):
    """A replacement replica started beside a running twin gets the same pool as the twin."""
    from dengine.kv import kv_cache

    cpu = torch.device("cpu")
    total = kv_cache.total_memory_bytes(cpu)
    budgets = []
    for free in (total, total // 10, 1 << 20):
        monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda device, free=free: free)
        budgets.append(resolve_memory_budget(0.2, cpu))
    assert budgets == [int(total * 0.2)] * 3
    assert "larger than" in caplog.text, "a pool above what is free is logged"


def test_cache_write_lands_in_the_mapped_slots(tmp_path, seed):
    from checkpoints import write_checkpoint

    folder, _ = write_checkpoint(tmp_path, "dream", seed=seed)
    _, config = read_model_config(folder)
    cache = PagedKVCache(config, num_blocks=6, block_size=4, dtype=torch.float32, device="cpu")
    key = torch.randn(3, config.num_kv_heads, config.head_dim)
    value = torch.randn_like(key)
    cache.write(1, key, value, torch.tensor([5, 0, 23]))  # block 1 offset 1, block 0 offset 0, block 5 offset 3
    assert torch.equal(cache.key[1][1, 1], key[0]) and torch.equal(cache.value[1][5, 3], value[2])
    assert torch.equal(cache.key[1][0, 0], key[1])
    assert cache.key[0].abs().sum() == 0, "other layers untouched"
