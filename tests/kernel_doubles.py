"""CPU test doubles of the GPU attention kernels dengine calls, written from the libraries' own sources.

flash-attn's flash_attn_varlen_func (contiguous or paged through block_table) and xformers'
memory_efficient_attention_forward with a BlockDiagonalMask check what the real calls check, raise what they
raise, compute the attention in fp32 and return the inputs' dtype. Waived on purpose, so that they run on
CPU: the device (CUDA, compute capability 8.0 or newer, which bf16 needs); every other rule is kept.

Sources, read at these commits:
  FA = Dao-AILab/flash-attention v2.8.3 (060c9188beec3a8b62b33a3bfa6d5d2d44975fab): csrc/flash_attn/flash_api.cpp
       (mha_varlen_fwd's TORCH_CHECKs), flash_attn/flash_attn_interface.py (flash_attn_varlen_func,
       FlashAttnVarlenFunc.forward, _flash_attn_varlen_forward), csrc/flash_attn/src/block_info.h and
       flash_fwd_kernel.h (what the kernel reads). The same checks hold at v2.6.0 (da11d1b8), the oldest
       version setup.py's `gpu` extra allows, which pads head_dim to a multiple of 8 in C++ instead.
  XF = facebookresearch/xformers v0.0.28 (c909f0d6a3f991c547bebe24b312286632a73473): xformers/ops/fmha/
       __init__.py (memory_efficient_attention_forward), common.py (Inputs.validate_inputs,
       AttentionOpBase.not_supported_reasons, check_lastdim_alignment_stride1), attn_bias.py
       (BlockDiagonalMask.from_seqlens, _SeqLenInfo), flash.py and cutlass.py (the two forward operators
       dispatch.py tries on CUDA, flash first). Unchanged in what is used here at v0.0.32.post2.

install(monkeypatch) puts both in sys.modules as `flash_attn` and `xformers.ops.fmha` and returns the log
of their calls, so tests can check how the backends called them (paged or gathered, copies, operator).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field

import torch

import dengine.attention

# ---------------------------------------------------------------------------------------------------------------
# flash-attn


@dataclass
class FlashCall:
    """One flash_attn_varlen_func call: whether it read the paged cache, and what its Python wrapper copied."""

    paged: bool
    copied: list[str]


def _check(condition: bool, message: str) -> None:
    """TORCH_CHECK: a RuntimeError with the library's message."""
    if not condition:
        raise RuntimeError(message)


def _check_shape(x: torch.Tensor, name: str, *shape: int) -> None:
    _check(tuple(x.shape) == shape, f"{name} must have shape {shape}")  # FA CHECK_SHAPE


def varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, softmax_scale: float,
               block_table: torch.Tensor | None = None) -> torch.Tensor:
    """FA flash_api.cpp mha_varlen_fwd (non-causal, no dropout, window, softcap or ALiBi): its checks, in its
    order, then the attention its kernel computes. Where the kernel checks nothing and would read outside the
    tensors (block_info.h, flash_fwd_kernel.h), the double raises; rows past max_seqlen_q of a sequence are
    never written by the kernel (torch::empty_like), and come back NaN."""
    dtype = q.dtype
    _check(dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    _check(k.dtype == dtype, "query and key must have the same dtype")
    _check(v.dtype == dtype, "query and value must have the same dtype")
    _check(cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must have dtype int32")
    _check(cu_seqlens_k.dtype == torch.int32, "cu_seqlens_k must have dtype int32")
    paged = block_table is not None
    # CHECK_DEVICE requires CUDA; the double keeps only "all on one device".
    for name, x in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                    ("block_table", block_table)):
        _check(x is None or x.device == q.device, f"{name} must be on {q.device}, like q")
    if paged:
        _check(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
        _check(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
    for x in (q, k, v):
        _check(x.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    _check(cu_seqlens_q.is_contiguous(), "cu_seqlens_q must be contiguous")
    _check(cu_seqlens_k.is_contiguous(), "cu_seqlens_k must be contiguous")

    _check(q.dim() == 3, "q must have shape (total_q, num_heads, head_size)")
    batch = cu_seqlens_q.numel() - 1
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[2] if paged else k.shape[1]
    page = k.shape[1] if paged else 1
    _check(not paged or page % 256 == 0, "Paged KV cache block size must be divisible by 256")
    # A single query row per sequence with GQA: q is reshaped to [batch, kv_heads, groups, head_dim] (the
    # "seqlenq_ngroups_swapped" path), which needs exactly one row per sequence.
    if max_seqlen_q == 1 and heads > kv_heads and head_dim % 8 == 0:
        _check(total_q == batch, f"shape '[{batch}, {kv_heads}, {heads // kv_heads}, {head_dim}]' is invalid for "
                                 f"input of size {q.numel()}")
    _check(batch > 0, "batch size must be positive")
    _check(head_dim <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(head_dim % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8")
    _check(heads % kv_heads == 0, "Number of heads in key/value must divide number of heads in query")
    _check_shape(q, "q", total_q, heads, head_dim)
    if paged:
        num_blocks, width = k.shape[0], block_table.shape[-1]
        _check_shape(k, "k", num_blocks, page, kv_heads, head_dim)
        _check_shape(v, "v", num_blocks, page, kv_heads, head_dim)
        _check_shape(block_table, "block_table", batch, width)
    else:
        _check_shape(k, "k", k.shape[0], kv_heads, head_dim)
        _check_shape(v, "v", k.shape[0], kv_heads, head_dim)
    _check_shape(cu_seqlens_q, "cu_seqlens_q", batch + 1)
    _check_shape(cu_seqlens_k, "cu_seqlens_k", batch + 1)

    q_starts, k_starts = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.full((total_q, heads, head_dim), float("nan"))
    for b in range(batch):
        q0, q1, k0, k1 = q_starts[b], q_starts[b + 1], k_starts[b], k_starts[b + 1]
        _check(0 <= q0 <= q1 <= total_q, f"sequence {b}: query rows [{q0}, {q1}) outside q's {total_q}")
        if paged:
            positions = torch.arange(k1 - k0)
            _check(positions.numel() <= width * page, f"sequence {b}: {k1 - k0} keys need more than the "
                                                      f"{width} blocks of its block_table row")
            blocks = block_table[b].cpu().long()[positions // page]
            _check(bool(((blocks >= 0) & (blocks < num_blocks)).all()), f"sequence {b}: block_table points "
                                                                         f"outside the {num_blocks} blocks")
            keys, values = k.cpu()[blocks, positions % page], v.cpu()[blocks, positions % page]
        else:
            _check(0 <= k0 <= k1 <= k.shape[0], f"sequence {b}: keys [{k0}, {k1}) outside k's {k.shape[0]}")
            keys, values = k[k0:k1].cpu(), v[k0:k1].cpu()
        rows = min(q1, q0 + max_seqlen_q)
        out[q0:rows] = _attention(q[q0:rows].cpu(), keys, values, softmax_scale)
    return out.to(dtype=dtype, device=q.device)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v in fp32 of q [n, heads, d] over k, v [s, kv_heads, d]; query head h reads KV head
    h // (heads // kv_heads), as flash_attn_varlen_func's docstring says ("head 0, 1, 2 of Q attend to head 0")."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))
    probs = torch.matmul(q.float().transpose(0, 1), k.transpose(1, 2)).mul(scale).softmax(-1)
    return torch.matmul(probs, v).transpose(0, 1)


class FlashAttnDouble:
    """The `flash_attn` module: flash_attn_varlen_func, with every call logged in calls."""

    def __init__(self) -> None:
        self.calls: list[FlashCall] = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        """FA flash_attn_interface.py: softmax_scale defaults to head_dim ** -0.5; a head_dim that is not a multiple
        of 8 is zero-padded (FlashAttnVarlenFunc.forward); q, k, v whose last dim is strided are copied
        (maybe_contiguous in _flash_attn_varlen_forward). Both copies are logged: on a paged cache they copy
        the whole cache, every layer."""
        if (dropout_p, causal, tuple(window_size), softcap, alibi_slopes, return_attn_probs) != (
                0.0, False, (-1, -1), 0.0, None, False):
            raise NotImplementedError("the double models non-causal attention only: no dropout, window, softcap, "
                                      "ALiBi or returned probabilities")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        head_dim, copied = q.shape[-1], []
        if head_dim % 8:
            q, k, v = (torch.nn.functional.pad(x, [0, 8 - head_dim % 8]) for x in (q, k, v))
            copied += ["q", "k", "v"]
        for name, x in zip("qkv", (q, k, v)):
            if x.stride(-1) != 1 and name not in copied:
                copied.append(name)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out = varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, block_table)
        self.calls.append(FlashCall(paged=block_table is not None, copied=copied))
        return out[..., :head_dim]


# ---------------------------------------------------------------------------------------------------------------
# xformers


@dataclass
class _SeqLenInfo:
    """XF attn_bias.py _SeqLenInfo: cumulative starts as an int32 tensor and as a Python list."""

    seqstart: torch.Tensor
    seqstart_py: list[int]
    max_seqlen: int
    min_seqlen: int

    @classmethod
    def from_seqlens(cls, seqlens, *, device: torch.device) -> "_SeqLenInfo":
        assert not isinstance(seqlens, torch.Tensor)  # XF _SeqLenInfo._get_seqstart
        starts = [0]
        for length in seqlens:
            starts.append(starts[-1] + length)
        return cls(torch.tensor(starts, dtype=torch.int32, device=device), starts, max(seqlens), min(seqlens))


@dataclass
class BlockDiagonalMask:
    """XF attn_bias.py: queries of block i attend to keys of block i only."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _SeqLenInfo

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None) -> "BlockDiagonalMask":
        """kv_seqlen defaults to q_seqlen; device to CUDA when available, else CPU (_get_default_bias_device)."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        assert kv_seqlen is None or len(q_seqlen) == len(kv_seqlen)
        q_seqinfo = _SeqLenInfo.from_seqlens(q_seqlen, device=device)
        if kv_seqlen is None or q_seqlen == kv_seqlen:
            return cls(q_seqinfo, q_seqinfo)
        return cls(q_seqinfo, _SeqLenInfo.from_seqlens(kv_seqlen, device=device))


@dataclass
class XFormersCall:
    """One memory_efficient_attention_forward call and the operator dispatch chose for it."""

    op: str


def _lastdim_alignment_stride1(reasons: list[str], name: str, x: torch.Tensor, alignment: int) -> None:
    """XF common.py check_lastdim_alignment_stride1."""
    if x.shape[-1] % alignment != 0:
        reasons.append(f"{name}.shape[-1] % {alignment} != 0")
    elif x.stride(-2) % alignment != 0:
        reasons.append(f"{name}.stride(-2) % {alignment} != 0 ({name}.stride() = {x.stride()})")
    if x.stride(-1) > 1:
        reasons.append(f"{name}.stride(-1) > 1 ({name}.stride() = {x.stride()}) - you should call `.contiguous()` "
                       "on the input")


def _flash_op_reasons(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[str]:
    """XF flash.py FwOp.not_supported_reasons (with AttentionOpBase's), on an sm80+ GPU."""
    reasons = []
    if query.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype={query.dtype} (supported: {{torch.float16, torch.bfloat16}})")
    if max(query.shape[-1], value.shape[-1]) > 256:
        reasons.append("max(query.shape[-1], value.shape[-1]) > 256")
    if query.shape[-1] != value.shape[-1]:
        reasons.append("query.shape[-1] != value.shape[-1]")
    _lastdim_alignment_stride1(reasons, "query", query, 8)
    for name, x in (("query", query), ("key", key), ("value", value)):
        # _check_strides_for_bmghk: the G and H dims must fold into one, unless H is broadcast (stride 0)
        if x.ndim == 5 and x.shape[2] != 1 and x.shape[3] != 1 and x.stride(3) != 0:
            if x.stride(2) != x.stride(3) * x.shape[-2]:
                reasons.append(f"GQA is only supported when the G/H dimensions are contiguous\n    {name}.stride:  "
                               f"{x.stride()}\n    {name}.shape :  {list(x.shape)}")
    return reasons


def _cutlass_op_reasons(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[str]:
    """XF cutlass.py FwOp.not_supported_reasons, on an sm80+ GPU (_minimum_gemm_alignment: 8 for 16-bit, 4 for fp32)."""
    reasons = []
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype={query.dtype} (supported: {{torch.float32, torch.float16, torch.bfloat16}})")
    if max(query.shape[-1], value.shape[-1]) > 65536:
        reasons.append("max(query.shape[-1], value.shape[-1]) > 65536")
    alignment = 4 if query.dtype == torch.float32 else 8
    _lastdim_alignment_stride1(reasons, "query", query, alignment)
    _lastdim_alignment_stride1(reasons, "value", value, alignment)
    return reasons


def _validate_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias) -> None:
    """XF common.py Inputs.validate_inputs, for no bias or a BlockDiagonalMask, in the BMHK or BMGHK layout."""
    qkv = (query, key, value)
    if query.ndim == 3:
        raise NotImplementedError("the double models the BMHK and BMGHK layouts, not BMK")
    if query.ndim not in (3, 4, 5) or any(x.ndim != query.ndim for x in qkv):
        raise ValueError(f"Query/Key/Value should all have BMGHK, BMHK or BMK shape.\n  query.shape: {query.shape}\n"
                         f"  key.shape  : {key.shape}\n  value.shape: {value.shape}")
    if any(x.device != query.device for x in qkv):
        raise ValueError("Query/Key/Value should all be on the same device")
    if isinstance(attn_bias, BlockDiagonalMask) and attn_bias.q_seqinfo.seqstart.device != query.device:
        raise ValueError(f"Attention bias and Query/Key/Value should be on the same device\n  query.device: "
                         f"{query.device}\n  attn_bias   : {attn_bias.q_seqinfo.seqstart.device}\n")
    if not all(x.dtype == query.dtype for x in qkv):
        raise ValueError("Query/Key/Value should either all have the same dtype, or (in the quantized case) "
                         f"Key/Value should have dtype torch.int32\n  query.dtype: {query.dtype}\n"
                         f"  key.dtype  : {key.dtype}\n  value.dtype: {value.dtype}")
    if isinstance(attn_bias, BlockDiagonalMask) and any(x.shape[0] != 1 for x in qkv):
        raise ValueError(f"Expected batch_size=1 when using block-diagonal bias\n  query.shape: {query.shape}\n"
                         f"  key.shape  : {key.shape}\n  value.shape: {value.shape}")
    batch, kv_len = key.shape[:2]
    middle = query.shape[2:-1]
    if (query.shape[0] != batch or key.shape != (batch, kv_len, *middle, query.shape[-1])
            or value.shape[:-1] != (batch, kv_len, *middle)):
        raise ValueError(f"Incompatible shapes for attention inputs:\n  query.shape: {query.shape}\n"
                         f"  key.shape  : {key.shape}\n  value.shape: {value.shape}\n"
                         "HINT: We don't support broadcasting, please use `expand` yourself before calling "
                         "`memory_efficient_attention` if you need to")


class XFormersDouble:
    """The `xformers.ops.fmha` module: memory_efficient_attention_forward and attn_bias.BlockDiagonalMask, with
    every call logged in calls."""

    def __init__(self) -> None:
        self.calls: list[XFormersCall] = []

    def memory_efficient_attention_forward(self, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                           output_dtype=None):
        """XF __init__.py: validate_inputs (ValueError), then the first operator of dispatch.py's CUDA list that
        supports the inputs, flash then cutlass (NotImplementedError when none does), then the attention in
        fp32, returned in query's dtype with value's last dim."""
        if op is not None or output_dtype is not None or p != 0.0:
            raise NotImplementedError("the double models the default dispatch without dropout or output_dtype")
        if attn_bias is not None and not isinstance(attn_bias, BlockDiagonalMask):
            raise NotImplementedError("the double models no bias or a BlockDiagonalMask")
        _validate_inputs(query, key, value, attn_bias)
        tried = {"fa2F": _flash_op_reasons(query, key, value), "cutlassF": _cutlass_op_reasons(query, key, value)}
        chosen = next((name for name, reasons in tried.items() if not reasons), None)
        if chosen is None:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                      + "\n".join(f"`{name}` is not supported because:\n    " + "\n    ".join(reasons)
                                                  for name, reasons in tried.items()))
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        batch, q_len = query.shape[:2]
        q_starts, k_starts = [0, q_len], [0, key.shape[1]]
        if attn_bias is not None:
            q_starts, k_starts = attn_bias.q_seqinfo.seqstart_py, attn_bias.k_seqinfo.seqstart_py
            # The kernels read the tensors through these starts without checking them (flash.py
            # _convert_input_format passes them on as cu_seqlens): the double refuses what they would misread.
            if q_starts[-1] != q_len or k_starts[-1] != key.shape[1]:
                raise RuntimeError(f"the mask covers {q_starts[-1]} queries and {k_starts[-1]} keys; the tensors "
                                   f"hold {q_len} and {key.shape[1]}")
        heads_shape = query.shape[2:-1]
        # [B, M, ..., K] -> [B, M, heads, K]: G and H folded (K/V broadcast over H read through stride 0)
        q3, k3, v3 = (x.reshape(batch, x.shape[1], -1, x.shape[-1]) for x in (query, key, value))
        out = torch.empty(batch, q_len, q3.shape[2], value.shape[-1])
        for b in range(batch):
            for q0, q1, k0, k1 in zip(q_starts, q_starts[1:], k_starts, k_starts[1:]):
                out[b, q0:q1] = _attention(q3[b, q0:q1].cpu(), k3[b, k0:k1].cpu(), v3[b, k0:k1].cpu(), scale)
        self.calls.append(XFormersCall(op=chosen))
        return out.view(batch, q_len, *heads_shape, value.shape[-1]).to(dtype=query.dtype, device=query.device)


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class KernelDoubles:
    """The installed doubles; their calls lists record how the backends called them."""

    flash: FlashAttnDouble = field(default_factory=FlashAttnDouble)
    xformers: XFormersDouble = field(default_factory=XFormersDouble)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec finds it
    module.__dict__.update(attributes)
    return module


def install(monkeypatch) -> KernelDoubles:
    """Make `import flash_attn` and `from xformers.ops import fmha` give the doubles, and let select_backend
    choose flash-attn and xformers on any device, for the duration of one test."""
    doubles = KernelDoubles()
    attn_bias = _module("xformers.ops.fmha.attn_bias", BlockDiagonalMask=BlockDiagonalMask)
    fmha = _module("xformers.ops.fmha", attn_bias=attn_bias, BlockDiagonalMask=BlockDiagonalMask,
                   memory_efficient_attention_forward=doubles.xformers.memory_efficient_attention_forward)
    ops = _module("xformers.ops", fmha=fmha)
    modules = {
        "flash_attn": _module("flash_attn", flash_attn_varlen_func=doubles.flash.flash_attn_varlen_func),
        "xformers": _module("xformers", ops=ops),
        "xformers.ops": ops,
        "xformers.ops.fmha": fmha,
        "xformers.ops.fmha.attn_bias": attn_bias,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(dengine.attention, "available_backends", lambda device: list(dengine.attention.BACKENDS))
    return doubles
