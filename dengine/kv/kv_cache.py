"""The paged K/V tensors, one pair per layer, sized from a memory budget."""

from __future__ import annotations

import logging
import os

import torch

from dengine.config import ModelConfig

logger = logging.getLogger(__name__)


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory_bytes(device: torch.device) -> int:
    """All of a device's memory: the GPU's, or the host's MemTotal on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = _meminfo_bytes("MemTotal")
    return total if total is not None else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on device: CUDA's free bytes, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_bytes("MemAvailable")
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_memory_budget(kv_cache_memory: int | float, device: torch.device) -> int:
    """Bytes for the KV pool: an int is bytes, a float in (0, 1] a fraction of the device's total memory.

    Total, not free: every replica of a deployment gets the same pool whatever happened to be free when it
    started (a replacement replica next to a running twin included). A budget above what is free now is
    logged: on a GPU the allocation will fail, on CPU pages are only taken as blocks are written."""
    if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, float)):
        raise ValueError(f"kv_cache_memory must be bytes (int) or a fraction (float), got {kv_cache_memory!r}")
    if isinstance(kv_cache_memory, float):
        if not 0.0 < kv_cache_memory <= 1.0:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {kv_cache_memory}")
        budget = int(total_memory_bytes(device) * kv_cache_memory)
    elif kv_cache_memory <= 0:
        raise ValueError(f"kv_cache_memory must be positive, got {kv_cache_memory}")
    else:
        budget = kv_cache_memory
    available = available_memory_bytes(device)
    if budget > available:
        logger.warning("the KV pool (%.2f GB) is larger than the %.2f GB %s memory free now", budget / 1e9,
                       available / 1e9, device.type)
    return budget


class PagedKVCache:
    """key[layer] and value[layer]: [num_blocks, block_size, kv_heads, head_dim] each.

    Keys are stored after RoPE: positions are absolute canvas indices, so a cached key stays valid
    until its own position is recomputed. A block can instead hold per-layer outputs (dLLM-Cache): the
    attention outputs of outputs_per_block tokens in its key half, their FFN outputs in its value half.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.hidden_size = config.hidden_size
        self.outputs_per_block = self.outputs_per_block_for(config, block_size)

    @staticmethod
    def outputs_per_block_for(config: ModelConfig, block_size: int) -> int:
        """How many tokens' attention and FFN outputs (hidden_size each) one block's K and V halves hold."""
        return block_size * config.kv_dim // config.hidden_size

    def layer_outputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [num_blocks, outputs_per_block, hidden] of the layer's key and value blocks: the cached
        attention outputs and FFN outputs; writes through them land in the pool."""
        used = self.outputs_per_block * self.hidden_size
        return tuple(  # type: ignore[return-value]
            cache.view(self.num_blocks, -1)[:, :used].view(self.num_blocks, self.outputs_per_block, self.hidden_size)
            for cache in (self.key[layer], self.value[layer])
        )

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V of every layer for block_size tokens."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.kv_dim * element

    @classmethod
    def num_blocks_for_budget(
        cls, config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
    ) -> int:
        """How many blocks budget_bytes holds; at least one, or a clear error."""
        per_block = cls.bytes_per_block(config, block_size, dtype)
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory of {budget_bytes} bytes holds no KV block "
                f"(one block of {block_size} tokens needs {per_block} bytes)"
            )
        return num_blocks

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Overwrite the cached K/V of the computed rows; slot = block * block_size + offset."""
        kv_heads, head_dim = key.shape[-2:]
        self.key[layer].view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, key)
        self.value[layer].view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, value)
