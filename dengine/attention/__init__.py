"""Attention backends behind one interface: plan(batch) -> attend(q, key_cache, value_cache).

torch (scaled_dot_product_attention, runs everywhere; the CPU default), flash-attn's varlen kernel
(paged through block tables when block_size is a multiple of 256) and xformers' memory-efficient
attention with a block-diagonal mask. select_backend picks the fastest one installed for the device.
"""

from __future__ import annotations

import importlib.util

import torch

from dengine.attention.base import AttentionBackend
from dengine.attention.flash import FlashAttentionBackend
from dengine.attention.torch_sdpa import TorchAttentionBackend
from dengine.attention.xformers_backend import XFormersAttentionBackend

BACKENDS: dict[str, type[AttentionBackend]] = {
    TorchAttentionBackend.name: TorchAttentionBackend,
    FlashAttentionBackend.name: FlashAttentionBackend,
    XFormersAttentionBackend.name: XFormersAttentionBackend,
}


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on device, fastest first."""
    names = []
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            names.append(FlashAttentionBackend.name)
        if importlib.util.find_spec("xformers") is not None:
            names.append(XFormersAttentionBackend.name)
    names.append(TorchAttentionBackend.name)
    return names


def select_backend(device: torch.device | str, name: str | None = None) -> AttentionBackend:
    """The named backend, or the fastest available on device when name is None or "auto"."""
    device = torch.device(device)
    usable = available_backends(device)
    if name in (None, "auto"):
        name = usable[0]
    if name not in BACKENDS:
        raise ValueError(f"attention_backend {name!r} is unknown; choose one of {sorted(BACKENDS)} or 'auto'")
    if name not in usable:
        raise ValueError(
            f"attention_backend {name!r} cannot run on {device} here (available: {usable}); "
            "flash-attn and xformers need CUDA and `pip install dengine[gpu]`"
        )
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "available_backends", "select_backend", "BACKENDS"]
