"""Layers shared by every model family: RMSNorm, RoPE, selective self-attention and the SwiGLU MLP."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dengine.config import ModelConfig
from dengine.forward_context import ForwardContext
from dengine.kv.kv_cache import PagedKVCache


class Fusible:
    """An elementwise step of the layers, run eagerly or, once fusion is enabled, compiled by inductor into one
    C++ loop for calls on at least min_rows rows (the row count a dynamic dimension, so one compilation serves
    every step). Eager torch makes a pass over memory per operation, which costs once a step's rows outgrow
    the cache; on few rows a compiled call's fixed cost exceeds what fusion saves."""

    min_rows: int | None = None  # shared by every Fusible; None: fusion off (enable_fusion sets it)

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.compiled: Callable[..., torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if Fusible.min_rows is None or x.shape[0] < Fusible.min_rows:
            return self.fn(x, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        return self.compiled(x, *args)


def enable_fusion(min_rows: int | None) -> None:
    """Compile the layers' elementwise steps for calls on at least min_rows rows (None: never)."""
    Fusible.min_rows = min_rows


@Fusible
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back to x's dtype, then scaled by the weight: the two roundings of
    LLaDA's and Dream's references (scaling in fp32 and rounding once moves bf16 cached decoding)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of NeoX RoPE for absolute canvas positions, in dtype, shape [N, 1, head_dim].

    NeoX RoPE rotates the pair (x[j], x[j + head_dim / 2]) by angle position * theta^(-2j / head_dim):
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); the sign is folded into the half of sin
    that meets x2. dtype is fp32 for LLaDA, the activation dtype for Dream (its reference casts them).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]


@Fusible
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim]: the reference's x * cos + rotate_half(x) * sin.

    With fp32 tables (LLaDA) in fp32, rounded once to x's dtype; with tables in x's dtype (Dream) in that
    dtype, rounding after each product and the sum exactly as Dream's reference does.
    """
    half = x.shape[-1] // 2
    if cos.dtype == x.dtype:
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin
    x32 = x.float()
    swapped = torch.cat((x32[..., half:], x32[..., :half]), dim=-1)
    return torch.addcmul(x32 * cos, swapped, sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional attention of the computed positions over their sequence's whole paged KV."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.kv_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: ForwardContext,
        kv_cache: PagedKVCache,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention outputs of x's rows: every batch row, or the sorted batch rows listed in rows."""
        n = x.shape[0]
        slot_mapping, attend = ctx.batch.slot_mapping, ctx.attend
        if rows is not None:
            rope = (rope[0].index_select(0, rows), rope[1].index_select(0, rows))
            slot_mapping, attend = slot_mapping.index_select(0, rows), ctx.layer_reuse.attend_rows
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the fused projection: rotate them in one pass
        qk = qkv[:, : self.q_size + self.kv_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rope(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        kv_cache.write(self.layer_idx, k, v, slot_mapping)
        if ctx.probe is not None:
            ctx.probe.record(q, kv_cache.key[self.layer_idx], rows)
        out = attend(q, kv_cache.key[self.layer_idx], kv_cache.value[self.layer_idx])
        return self.o_proj(out.reshape(n, self.q_size))

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """V alone [n, kv_heads, head_dim] of x's rows (dLLM-Cache compares it with the cached V)."""
        start, proj = self.q_size + self.kv_size, self.qkv_proj
        bias = None if proj.bias is None else proj.bias[start:]
        weight = proj.kept if isinstance(proj, PrepackedLinear) else proj.weight[start:]
        return F.linear(x, weight, bias).view(-1, self.num_kv_heads, self.head_dim)


class PrepackedLinear(nn.Module):
    """A bf16 nn.Linear on CPU whose weight oneDNN lays out once for its matmul kernel.

    torch's bf16 linear on CPU calls oneDNN, which reorders the plain weight into its blocked layout on every
    call: a fixed cost that dominates small steps (an 18-row step's 256 x 1536 projection, 2 threads: 39 us
    plain, 28.5 us prepacked; a 4096 x 12288 one, 6.3 against 4.1 ms). Same kernel, same results bit for bit
    (checked when packing and in tests/test_forward.py). The plain weight is not kept, so the weights take
    the memory they took before: `weight` reads it back from the packed layout (a copy, for references and
    tools), and `kept` holds the plain rows from keep_from on (qkv's V rows, which dLLM-Cache multiplies
    alone), or None."""

    def __init__(self, linear: nn.Linear, keep_from: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.kept = None if keep_from is None else weight[keep_from:].clone()

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether PrepackedLinear runs here and computes F.linear's bf16 result exactly (tried on a small case)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 48, dtype=torch.bfloat16)
        x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            return torch.equal(PrepackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias))
    except (RuntimeError, AttributeError):  # no oneDNN bf16 kernels on this CPU / build
        return False


def prepack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of model by a PrepackedLinear (the attention's qkv keeping V's plain rows), one at
    a time, each plain weight freed as its packed copy replaces it; returns how many."""
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children() if type(child) is nn.Linear]
    with torch.no_grad():
        for parent, name in places:
            keep_from = parent.q_size + parent.kv_size if isinstance(parent, SelfAttention) and name == "qkv_proj" else None
            setattr(parent, name, PrepackedLinear(getattr(parent, name), keep_from))
    return len(places)


def prepack_if_supported(model: nn.Module) -> bool:
    """bf16 on CPU: give model's linear layers oneDNN-prepacked weights (PrepackedLinear, no extra memory) where
    oneDNN's packed kernel runs and matches the plain one; whether it did."""
    first = next((m.weight for m in model.modules() if type(m) is nn.Linear), None)
    if first is None or not can_prepack(first):
        return False
    prepack_linears(model)
    return True


def num_weights(model: nn.Module) -> int:
    """The model's parameter count, prepacked linear weights included."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PrepackedLinear))
    return packed + sum(p.numel() for p in model.parameters())


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_gate(self.gate_up_proj(x)))


@Fusible
def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate / up projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = SelfAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: ForwardContext,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        reuse = ctx.layer_reuse
        if reuse is None:
            x = x + self.attn(self.attn_norm(x), rope, ctx, kv_cache)
            return x + self.mlp(self.mlp_norm(x))
        # Some sequences reuse cached attention / FFN outputs (dLLM-Cache): compute only this layer's rows.
        h = self.attn_norm(x)
        layer = self.attn.layer_idx
        rows = reuse.select(layer, h, self.attn.values, kv_cache)
        if rows.active is not None:
            h = h.index_select(0, rows.active)
        x = reuse.merge(x, self.attn(h, rope, ctx, kv_cache, rows.active), rows, layer, 0, kv_cache)
        h = self.mlp_norm(x if rows.active is None else x.index_select(0, rows.active))
        return reuse.merge(x, self.mlp(h), rows, layer, 1, kv_cache)
