"""The dense reference forward: plain per-layer math over a whole canvas, for checking the paged path.

It reads the model's weights but none of its forward code. With `stale` it reproduces a selective step:
only `query` positions are computed, every other position's K/V is taken from `stale`.
"""

from __future__ import annotations

import torch

from dengine.models.transformer import DiffusionLM


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float, in_fp32: bool) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    rotated_half = lambda t: torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)  # noqa: E731
    if in_fp32:
        xf = x.float()
        return (xf * cos + rotated_half(xf) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotated_half(x) * sin


@torch.no_grad()
def dense_forward(
    model: DiffusionLM,
    tokens: torch.Tensor,
    query: torch.Tensor | None = None,
    stale: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits at `query` (default: every position) and every layer's full [T, kv_heads, head_dim] K/V."""
    c = model.config
    t = tokens.numel()
    query = torch.arange(t) if query is None else query
    group = c.num_heads // c.num_kv_heads
    x = model.embed.weight[tokens[query]]
    kv_out = []
    for i, layer in enumerate(model.layers):
        h = _rms(x, layer.attn_norm.weight, c.rms_norm_eps)
        qkv = h @ layer.attn.qkv_proj.weight.T
        if layer.attn.qkv_proj.bias is not None:
            qkv = qkv + layer.attn.qkv_proj.bias
        q_size = c.num_heads * c.head_dim
        q, k, v = qkv.split([q_size, c.kv_dim, c.kv_dim], -1)
        q = _rope(q.view(-1, c.num_heads, c.head_dim), query, c.rope_theta, c.rope_in_fp32)
        k = _rope(k.view(-1, c.num_kv_heads, c.head_dim), query, c.rope_theta, c.rope_in_fp32)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if stale is None:
            full_k = torch.zeros(t, c.num_kv_heads, c.head_dim, dtype=k.dtype)
            full_v = torch.zeros_like(full_k)
        else:
            full_k, full_v = stale[i][0].clone(), stale[i][1].clone()
        full_k[query], full_v[query] = k, v
        kv_out.append((full_k, full_v))
        keys = full_k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, T, d]
        values = full_v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) / c.head_dim**0.5
        attn = (scores.float().softmax(-1).to(values.dtype) @ values).transpose(0, 1).reshape(-1, q_size)
        x = x + attn @ layer.attn.o_proj.weight.T
        h = _rms(x, layer.mlp_norm.weight, c.rms_norm_eps)
        gate, up = (h @ layer.mlp.gate_up_proj.weight.T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer.mlp.down_proj.weight.T
    logits = _rms(x, model.final_norm.weight, c.rms_norm_eps) @ model.lm_head.weight.T
    return logits, kv_out


@torch.no_grad()
def dense_reuse_forward(
    model: DiffusionLM,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    always: torch.Tensor,
    candidates: torch.Tensor,
    count: int,
    state: list[list[torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One dLLM-Cache step in plain dense math, with every layer's state [K, V, attention out, FFN out] held
    over the whole canvas (updated in place). Returns the logits at rows and, per layer, the head-averaged
    attention probabilities of the rows it recomputed."""
    c = model.config
    q_size, group = c.num_heads * c.head_dim, c.num_heads // c.num_kv_heads
    x = model.embed.weight[tokens[rows]]
    probabilities = []
    for i, layer in enumerate(model.layers):
        keys, values, attn_cache, ffn_cache = state[i]
        h = _rms(x, layer.attn_norm.weight, c.rms_norm_eps)
        qkv = h @ layer.attn.qkv_proj.weight.T
        if layer.attn.qkv_proj.bias is not None:
            qkv = qkv + layer.attn.qkv_proj.bias
        q, k, v = qkv.split([q_size, c.kv_dim, c.kv_dim], -1)
        q = _rope(q.view(-1, c.num_heads, c.head_dim), rows, c.rope_theta, c.rope_in_fp32)
        k = _rope(k.view(-1, c.num_kv_heads, c.head_dim), rows, c.rope_theta, c.rope_in_fp32)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        active = torch.ones(rows.numel(), dtype=torch.bool)
        if i > 0:
            index = {int(p): r for r, p in enumerate(rows)}
            at = torch.tensor([index[int(p)] for p in candidates], dtype=torch.long)
            similarity = torch.nn.functional.cosine_similarity(v[at].flatten(1), values[candidates].flatten(1), dim=-1)
            chosen = candidates[similarity.topk(count, largest=False).indices]
            values[candidates] = v[at]
            active = torch.isin(rows, torch.cat([always, chosen]))
        keys[rows[active]], values[rows[active]] = k[active], v[active]
        full_k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
        full_v = values.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q[active].transpose(0, 1) @ full_k.transpose(1, 2)) / c.head_dim**0.5
        probs = scores.float().softmax(-1)
        probabilities.append(probs.mean(0))
        out = (probs.to(full_v.dtype) @ full_v).transpose(0, 1).reshape(-1, q_size) @ layer.attn.o_proj.weight.T
        attn_cache[rows[active]] = out
        x = x + attn_cache[rows]
        h = _rms(x, layer.mlp_norm.weight, c.rms_norm_eps)
        gate, up = (h @ layer.mlp.gate_up_proj.weight.T).chunk(2, -1)
        ffn = (torch.nn.functional.silu(gate) * up) @ layer.mlp.down_proj.weight.T
        ffn_cache[rows[active]] = ffn[active]
        x = x + ffn_cache[rows]
    logits = _rms(x, model.final_norm.weight, c.rms_norm_eps) @ model.lm_head.weight.T
    return logits, probabilities


def empty_reuse_state(model: DiffusionLM, length: int) -> list[list[torch.Tensor]]:
    """Zeroed [K, V, attention out, FFN out] per layer for dense_reuse_forward."""
    c = model.config
    dtype = model.embed.weight.dtype
    kv = (length, c.num_kv_heads, c.head_dim)
    return [
        [torch.zeros(kv, dtype=dtype), torch.zeros(kv, dtype=dtype),
         torch.zeros(length, c.hidden_size, dtype=dtype), torch.zeros(length, c.hidden_size, dtype=dtype)]
        for _ in range(c.num_layers)
    ]
