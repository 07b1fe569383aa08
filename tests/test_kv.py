"""The block pool, per-sequence block tables and the KV pool's sizing (the plan, lazily committed pages)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from dengine.kv import (
    BlockPool,
    KVCacheManager,
    NoFreeBlocksError,
    PagedKVCache,
    RequestTooLargeError,
    plan_kv_pool,
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


def test_freed_blocks_are_reused_first():
    """LIFO reuse keeps a lazily committed CPU pool's resident pages those of the peak load."""
    pool = BlockPool(8)
    first = pool.allocate(3)
    pool.free(first)
    assert pool.allocate(3) == first


def _memory(monkeypatch, free: int, total: int = 1 << 40) -> None:
    from dengine.kv import kv_cache

    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda device: free)
    monkeypatch.setattr(kv_cache, "total_memory_bytes", lambda device: total)


def test_default_pool_is_what_the_load_needs_when_memory_allows(monkeypatch):
    _, llada = read_model_config(REAL["llada"])
    _memory(monkeypatch, free=1 << 40)
    cpu = torch.device("cpu")
    per_canvas = -(-llada.max_position_embeddings // 16)
    plan = plan_kv_pool(llada, 16, torch.bfloat16, cpu, max_num_seqs=3)
    assert plan.num_blocks == 3 * per_canvas and "max_num_seqs=3" in plan.reason
    assert plan.bytes == plan.num_blocks * PagedKVCache.bytes_per_block(llada, 16, torch.bfloat16)
    dllm = plan_kv_pool(llada, 16, torch.bfloat16, cpu, max_num_seqs=3, layer_outputs=True)
    outputs_per_block = PagedKVCache.outputs_per_block_for(llada, 16)
    assert dllm.num_blocks == 3 * (per_canvas + -(-llada.max_position_embeddings // outputs_per_block))


def test_default_pool_is_capped_by_memory_left_after_the_weights(monkeypatch, caplog):
    from dengine.kv import kv_cache

    _, llada = read_model_config(REAL["llada"])
    per_block = PagedKVCache.bytes_per_block(llada, 16, torch.bfloat16)
    cpu = torch.device("cpu")
    _memory(monkeypatch, free=40 * per_block)
    plan = plan_kv_pool(llada, 16, torch.bfloat16, cpu, max_num_seqs=64)
    assert plan.num_blocks == int(40 * per_block * kv_cache.CPU_SHARE_OF_AVAILABLE) // per_block
    assert "available after the weights" in plan.reason and "less than one canvas" in caplog.text
    _memory(monkeypatch, free=per_block)
    with pytest.raises(ValueError, match="no memory for a KV pool"):
        plan_kv_pool(llada, 16, torch.bfloat16, cpu, max_num_seqs=64)
    explicit = plan_kv_pool(llada, 16, torch.bfloat16, cpu, max_num_seqs=64, kv_cache_memory=7 * per_block)
    assert explicit.num_blocks == 7, "a budget the user sets is taken as given"


def test_gpu_cap_keeps_a_reserve_of_the_card(monkeypatch):
    from dengine.kv import kv_cache

    _memory(monkeypatch, free=50 << 30, total=80 << 30)
    cap, why = kv_cache.memory_cap_bytes(torch.device("cuda"))
    assert cap == (50 << 30) - int((80 << 30) * (1 - kv_cache.GPU_MEMORY_UTILIZATION)) and "reserve" in why


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_cpu_pool_pages_are_committed_only_when_written():
    _, llada = read_model_config(REAL["llada"])
    block_bytes = PagedKVCache.bytes_per_block(llada, 16, torch.float32)
    num_blocks = (512 << 20) // block_bytes
    before = _resident_bytes()
    cache = PagedKVCache(llada, num_blocks, 16, torch.float32, "cpu")
    allocated = _resident_bytes() - before
    assert allocated < 32 << 20, f"{allocated / 2**20:.0f} MiB resident for an unwritten 512 MiB pool"
    assert all(float(t.abs().max()) == 0.0 for t in cache.key[:1] + cache.value[:1]), "reads as zeros"
    key = torch.randn(16, llada.num_kv_heads, llada.head_dim)
    for layer in range(llada.num_layers):
        cache.write(layer, key, key, torch.arange(16) + 16 * (num_blocks - 1))
    assert torch.equal(cache.key[0][num_blocks - 1], key)


def test_the_engine_logs_its_pool_and_why(tmp_path, caplog, seed):
    import logging

    from checkpoints import write_checkpoint
    from dengine import LLMEngine

    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed)
    with caplog.at_level(logging.INFO, logger="dengine.engine"):
        engine = LLMEngine(folder, dtype="float32", max_num_seqs=3, block_size=8)
    per_canvas = -(-engine.config.max_position_embeddings // 8)
    assert engine.kv_manager.pool.num_blocks == 3 * per_canvas, "a small model's pool is what its load needs"
    assert f"KV pool: {3 * per_canvas} blocks of 8 tokens" in caplog.text and "max_num_seqs=3" in caplog.text
