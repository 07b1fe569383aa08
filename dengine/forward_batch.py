"""The flat, ragged description of one forward step, and the step's two transfers between host and device."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import torch


@dataclass
class ForwardBatch:
    """Query rows of several sequences, concatenated sequence after sequence.

    Each sequence i contributes query_lens[i] rows (its computed positions) and attends to all
    seq_lens[i] positions of its own canvas, read from the paged cache through its block table.
    """

    input_ids: torch.Tensor  # [N] token at each computed position
    positions: torch.Tensor  # [N] canvas index of each computed position (RoPE)
    slot_mapping: torch.Tensor  # [N] flat cache slot the row's K/V are written to
    logits_indices: torch.Tensor  # [M] rows whose logits are returned, in this order
    query_lens: list[int]
    seq_lens: list[int]
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    block_tables: torch.Tensor  # [B, max blocks] int32, rows padded with 0 past a sequence's blocks
    kv_slots: torch.Tensor  # [sum(seq_lens)] flat slot of every key position, sequence after sequence
    block_size: int
    # The same batch built on the host, which planning reads instead of the device tensors (reading those would
    # wait for the device); None when this batch's tensors are the host's.
    host: ForwardBatch | None = field(default=None, repr=False)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    @property
    def on_host(self) -> ForwardBatch:
        """The batch whose tensors the host reads without a device sync."""
        return self if self.host is None else self.host


# Each tensor's bytes start at a multiple of this in a packed buffer, so every dtype views its slice in place.
ALIGNMENT = 16


def _offsets(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT
    return offsets, total


def pack(tensors: list[torch.Tensor], pin_memory: bool = False) -> torch.Tensor:
    """The tensors' bytes in one uint8 buffer on their device (pinned host memory when pin_memory)."""
    offsets, total = _offsets(tensors)
    buffer = torch.empty(total, dtype=torch.uint8, device=tensors[0].device, pin_memory=pin_memory)
    for tensor, start in zip(tensors, offsets):
        raw = tensor.contiguous().view(-1).view(torch.uint8)
        buffer[start : start + raw.numel()].copy_(raw)
    return buffer


def unpack(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a pack()ed buffer with the shapes and dtypes of the tensors packed into it."""
    offsets, _ = _offsets(like)
    return [buffer[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, start in zip(like, offsets)]


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The step's one host-to-device copy: every host-built tensor the forward reads, packed into one (pinned on
    CUDA) buffer, sent asynchronously, viewed on the device. On CPU the tensors themselves, no copy."""
    if device.type == "cpu" or not tensors:
        return list(tensors)
    buffer = pack(tensors, pin_memory=device.type == "cuda")
    return unpack(buffer.to(device, non_blocking=True), tensors)


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's one device-to-host copy: every tensor the host reads after the forward (the logits the
    samplers read, the attention a policy reads), packed on the device into one buffer. It waits for the
    forward: the samplers need its result. On CPU the tensors themselves, no copy."""
    if not tensors or tensors[0].device.type == "cpu":
        return list(tensors)
    packed = tensors[0].reshape(-1).view(torch.uint8) if len(tensors) == 1 else pack(tensors)
    buffer = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=packed.is_cuda)
    buffer.copy_(packed, non_blocking=packed.is_cuda)
    if packed.is_cuda:
        torch.cuda.current_stream(packed.device).synchronize()
    return unpack(buffer, tensors)


Record = TypeVar("Record")


def tensor_fields(record: object) -> list[str]:
    """The names of a dataclass's tensor fields, in order."""
    return [f.name for f in fields(record) if isinstance(getattr(record, f.name), torch.Tensor)]


def records_to_device(records: list[Record | None], device: torch.device) -> list[Record | None]:
    """Dataclasses built on the host (None stays None), with every tensor field on the device, all in one
    to_device; a tensor that several fields share is sent once, and they share its device copy."""
    names = [[] if record is None else tensor_fields(record) for record in records]
    unique = {id(getattr(r, name)): getattr(r, name) for r, ns in zip(records, names) for name in ns}
    sent = dict(zip(unique, to_device(list(unique.values()), device)))
    return [None if r is None else replace(r, **{name: sent[id(getattr(r, name))] for name in ns})
            for r, ns in zip(records, names)]
