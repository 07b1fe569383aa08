"""The paged K/V tensors, one pair per layer, and the plan that sizes them: what the load needs, capped by the
memory left after the weights (or the budget the user sets)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from dengine.config import ModelConfig
from dengine.kv.manager import canvas_blocks

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


# Default pool caps when kv_cache_memory is not given: what the pool may take of the memory left once the
# weights are loaded. On CPU the rest stays for activations, the tokenizer, Ray and the other processes of a
# shared host; on a GPU the pool may take the free memory above a reserve of (1 - utilization) of the card.
CPU_SHARE_OF_AVAILABLE = 0.5
GPU_MEMORY_UTILIZATION = 0.9


def resolve_memory_budget(kv_cache_memory: int | float, device: torch.device) -> int:
    """Bytes for the KV pool when the user sets kv_cache_memory: an int is bytes, a float in (0, 1] a fraction
    of the device's total memory (the same pool on every replica, whatever is free when it starts). A budget
    above what is free now is logged: on a GPU the allocation will fail, on CPU pages are only taken as blocks
    are written."""
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


def memory_cap_bytes(device: torch.device) -> tuple[int, str]:
    """What a default pool may take now (call it after the weights are loaded), and how that was decided."""
    available = available_memory_bytes(device)
    if device.type == "cuda":
        reserve = int(total_memory_bytes(device) * (1 - GPU_MEMORY_UTILIZATION))
        return max(0, available - reserve), (f"{available / 1e9:.2f} GB free on the GPU after the weights, less a "
                                             f"{reserve / 1e9:.2f} GB reserve ({1 - GPU_MEMORY_UTILIZATION:.0%} of the card)")
    return int(available * CPU_SHARE_OF_AVAILABLE), (f"{CPU_SHARE_OF_AVAILABLE:.0%} of the {available / 1e9:.2f} GB "
                                                     "of RAM available after the weights")


@dataclass(frozen=True)
class KVPoolPlan:
    """How many KV blocks to allocate, and why (the engine logs `reason`)."""

    num_blocks: int
    block_bytes: int
    reason: str

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes


def plan_kv_pool(config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device, *,
                 max_num_seqs: int, kv_cache_memory: int | float | None = None,
                 layer_outputs: bool = False) -> KVPoolPlan:
    """Size the KV pool. Given kv_cache_memory (bytes or a fraction of total memory), exactly that. Otherwise
    what the load needs, max_num_seqs canvases of the model's longest context (at least two, as a guided request
    takes; with dLLM-Cache's per-layer outputs when layer_outputs), capped by memory_cap_bytes: a small model gets a small pool, a large one what
    is left after its weights. ValueError if not one block fits; a pool smaller than one longest canvas is
    logged (requests longer than the pool are refused)."""
    per_block = PagedKVCache.bytes_per_block(config, block_size, dtype)
    longest = config.max_position_embeddings
    outputs_per_block = PagedKVCache.outputs_per_block_for(config, block_size)
    per_canvas = canvas_blocks(longest, block_size, outputs_per_block, layer_outputs and outputs_per_block > 0)
    if kv_cache_memory is not None:
        budget = resolve_memory_budget(kv_cache_memory, device)
        num_blocks = PagedKVCache.num_blocks_for_budget(config, block_size, dtype, budget)
        reason = f"kv_cache_memory={kv_cache_memory!r}"
    else:
        need = max(max_num_seqs, 2) * per_canvas  # two: one guided request (LLaDA's cfg) takes two canvases
        cap, why = memory_cap_bytes(device)
        num_blocks = min(need, cap // per_block)
        reason = (f"max_num_seqs={max_num_seqs} canvases of {longest} tokens need {need * per_block / 1e9:.3f} GB; "
                  f"the cap is {why}, {cap / 1e9:.2f} GB")
        if num_blocks < 1:
            raise ValueError(f"no memory for a KV pool: {reason}; free memory or set kv_cache_memory")
    if num_blocks < per_canvas:
        logger.warning("the KV pool (%d blocks of %d tokens) holds less than one canvas of the model's %d positions: "
                       "longer requests are refused", num_blocks, block_size, longest)
    return KVPoolPlan(num_blocks, per_block, reason)


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor; on CPU its pages are mapped zero pages the kernel commits only when written (calloc, not
    an allocation then a write of every byte), so a pool's resident memory follows the blocks used."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    element = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(math.prod(shape) * element, dtype=np.uint8)  # numpy's calloc: untouched pages stay unmapped
    return torch.from_numpy(raw).view(dtype).view(shape)


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
        self.key = [lazily_zeroed(shape, dtype, device) for _ in range(config.num_layers)]
        self.value = [lazily_zeroed(shape, dtype, device) for _ in range(config.num_layers)]
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
