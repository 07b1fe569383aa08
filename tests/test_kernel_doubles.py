"""The kernel doubles themselves: what they refuse (as the real libraries do) and what they compute."""

from __future__ import annotations

import random

import pytest
import torch

from kernel_doubles import BlockDiagonalMask, FlashAttnDouble, XFormersDouble, varlen_fwd


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp64 softmax(q k^T / sqrt(d)) v of q [n, heads, d] over k, v [s, kv_heads, d], query head h on KV head
    h // (heads // kv_heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    probs = torch.einsum("nhd,shd->hns", q.double(), k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("hns,shd->nhd", probs, v)


def _ragged(rng: random.Random, heads: int, kv_heads: int, head_dim: int, page: int, dtype=torch.bfloat16):
    """A random ragged batch: q rows, cu_seqlens, and the keys both contiguous and in a shuffled paged cache."""
    q_lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 4))]
    k_lens = [rng.randint(n, 600) for n in q_lens]
    pages = [-(-n // page) for n in k_lens]
    order = list(range(sum(pages) + 2))
    rng.shuffle(order)
    table = torch.zeros(len(k_lens), max(pages), dtype=torch.int32)
    for i, count in enumerate(pages):
        table[i, :count] = torch.tensor([order.pop() for _ in range(count)])
    k_cache = torch.randn(sum(pages) + 2, page, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(dtype)
    keys, values = [], []
    for i, n in enumerate(k_lens):
        positions = torch.arange(n)
        blocks = table[i].long()[positions // page]
        keys.append(k_cache[blocks, positions % page])
        values.append(v_cache[blocks, positions % page])
    q = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
    cu = {name: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
          for name, lens in (("q", q_lens), ("k", k_lens))}
    return dict(q=q, k=torch.cat(keys), v=torch.cat(values), k_cache=k_cache, v_cache=v_cache, table=table,
                cu_q=cu["q"], cu_k=cu["k"], q_lens=q_lens, k_lens=k_lens)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x's values in a tensor whose last dim has stride 2."""
    return torch.stack([x, x], -1)[..., 0]


def _call(flash: FlashAttnDouble, b: dict, paged: bool, **overrides):
    args = dict(q=b["q"], k=b["k_cache"] if paged else b["k"], v=b["v_cache"] if paged else b["v"],
                cu_seqlens_q=b["cu_q"], cu_seqlens_k=b["cu_k"], max_seqlen_q=max(b["q_lens"]),
                max_seqlen_k=max(b["k_lens"]), block_table=b["table"] if paged else None)
    args.update(overrides)
    return flash.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 1, 64), (2, 3, 128), (1, 4, 256)])
def test_flash_double_paged_and_contiguous_compute_the_varlen_attention(seed, kv_heads, group, head_dim):
    rng, flash = random.Random(seed), FlashAttnDouble()
    b = _ragged(rng, kv_heads * group, kv_heads, head_dim, page=256)
    contiguous, paged = _call(flash, b, paged=False), _call(flash, b, paged=True)
    assert contiguous.dtype == torch.bfloat16 and contiguous.shape == b["q"].shape
    assert torch.equal(contiguous, paged)
    starts = b["cu_q"].tolist()
    k_starts = b["cu_k"].tolist()
    for i in range(len(b["q_lens"])):
        rows, keys = slice(starts[i], starts[i + 1]), slice(k_starts[i], k_starts[i + 1])
        truth = _reference(b["q"][rows], b["k"][keys], b["v"][keys])
        assert (paged[rows].double() - truth).abs().max() <= 2**-8 * truth.abs().max()  # one bf16 rounding
    assert [(c.paged, c.copied) for c in flash.calls] == [(False, []), (True, [])]


def test_flash_double_refuses_what_flash_attn_refuses(seed):
    flash = FlashAttnDouble()
    b = _ragged(random.Random(seed), 4, 2, 64, page=256)
    refused = {
        "only support fp16 and bf16": dict(q=b["q"].float(), k=b["k"].float(), v=b["v"].float()),
        "query and key must have the same dtype": dict(k=b["k"].half()),
        "cu_seqlens_q must have dtype int32": dict(cu_seqlens_q=b["cu_q"].long()),
        "cu_seqlens_k must have dtype int32": dict(cu_seqlens_k=b["cu_k"].long()),
        "at most 256": dict(q=b["q"].repeat(1, 1, 8), k=b["k"].repeat(1, 1, 8), v=b["v"].repeat(1, 1, 8)),
        "must divide number of heads in query": dict(q=b["q"][:, :3]),
        "k must have shape": dict(k=b["k"][:, :, :32]),
    }
    for message, overrides in refused.items():
        with pytest.raises(RuntimeError, match=message):
            _call(flash, b, paged=False, **overrides)
    small = _ragged(random.Random(seed), 4, 2, 64, page=16)
    with pytest.raises(RuntimeError, match="Paged KV cache block size must be divisible by 256"):
        _call(flash, small, paged=True)
    paged_refused = {
        "block_table must have dtype torch.int32": dict(block_table=b["table"].long()),
        "block_table must have contiguous last dimension": dict(block_table=_strided(b["table"])),
        "block_table must have shape": dict(block_table=b["table"][:, None]),
    }
    for message, overrides in paged_refused.items():
        with pytest.raises(RuntimeError, match=message):
            _call(flash, b, paged=True, **overrides)
    assert not flash.calls


def test_flash_double_refuses_reads_outside_its_inputs(seed):
    flash = FlashAttnDouble()
    b = _ragged(random.Random(seed), 4, 2, 64, page=256)
    with pytest.raises(RuntimeError, match="more than the"):
        _call(flash, b, paged=True, block_table=b["table"][:, :0].contiguous())
    with pytest.raises(RuntimeError, match="outside the"):
        _call(flash, b, paged=True, block_table=b["table"] + 1000)
    with pytest.raises(RuntimeError, match="keys .* outside"):
        _call(flash, b, paged=False, k=b["k"][:-1], v=b["v"][:-1])
    # GQA with one query row per sequence folds the groups into rows: every sequence needs its row
    one_row = dict(q=b["q"][:1], cu_seqlens_q=torch.tensor([0] + [1] * len(b["q_lens"]), dtype=torch.int32),
                   max_seqlen_q=1)
    if len(b["q_lens"]) > 1:
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            _call(flash, b, paged=False, **one_row)


def test_flash_double_rows_past_max_seqlen_q_are_never_written(seed):
    flash = FlashAttnDouble()
    b = _ragged(random.Random(seed), 2, 2, 64, page=256)
    longest = max(b["q_lens"])
    out = _call(flash, b, paged=False, max_seqlen_q=longest - 1)
    unwritten = sum(max(0, n - (longest - 1)) for n in b["q_lens"])
    assert int(out.isnan().any(-1).any(-1).sum()) == unwritten > 0


def test_flash_wrapper_copies_a_strided_last_dim_and_pads_head_dims(seed):
    """flash_attn_varlen_func copies q, k, v whose last dim is strided and pads a head_dim to a multiple of 8;
    the kernel entry point underneath refuses the strided last dim."""
    flash = FlashAttnDouble()
    b = _ragged(random.Random(seed), 4, 2, 64, page=256)
    strided_k = _strided(b["k"])
    with pytest.raises(RuntimeError, match="Input tensor must have contiguous last dimension"):
        varlen_fwd(b["q"], strided_k, b["v"], b["cu_q"], b["cu_k"], max(b["q_lens"]), 0.125)
    assert torch.equal(_call(flash, b, paged=False, k=strided_k), _call(flash, b, paged=False))
    narrow = {name: b[name][..., :20] for name in ("q", "k", "v")}
    out = _call(flash, b, paged=False, **narrow)
    assert out.shape[-1] == 20
    assert [c.copied for c in flash.calls] == [["k"], [], ["q", "k", "v"]]
    with pytest.raises(NotImplementedError):
        _call(flash, b, paged=False, causal=True)


def _five_d(b: dict, heads: int, kv_heads: int):
    """q, k, v of a ragged batch in xformers' BMGHK layout, K/V broadcast over each group's heads."""
    n, head_dim = b["q"].shape[0], b["q"].shape[-1]
    shape = (1, b["k"].shape[0], kv_heads, heads // kv_heads, head_dim)
    q = b["q"].view(1, n, kv_heads, heads // kv_heads, head_dim)
    return q, b["k"][None, :, :, None].expand(shape), b["v"][None, :, :, None].expand(shape)


@pytest.mark.parametrize("kv_heads,group", [(4, 1), (2, 2), (1, 4)])
def test_xformers_double_block_diagonal_attention(seed, kv_heads, group):
    xformers = XFormersDouble()
    b = _ragged(random.Random(seed), kv_heads * group, kv_heads, 64, page=16)
    q, k, v = _five_d(b, kv_heads * group, kv_heads)
    mask = BlockDiagonalMask.from_seqlens(b["q_lens"], b["k_lens"], device=torch.device("cpu"))
    out = xformers.memory_efficient_attention_forward(q, k, v, attn_bias=mask)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    flat, starts, k_starts = out.view(b["q"].shape), b["cu_q"].tolist(), b["cu_k"].tolist()
    for i in range(len(b["q_lens"])):
        rows, keys = slice(starts[i], starts[i + 1]), slice(k_starts[i], k_starts[i + 1])
        truth = _reference(b["q"][rows], b["k"][keys], b["v"][keys])
        assert (flat[rows].double() - truth).abs().max() <= 2**-8 * truth.abs().max()
    assert [c.op for c in xformers.calls] == ["fa2F"]


def test_xformers_double_refuses_what_xformers_refuses(seed):
    xformers = XFormersDouble()
    b = _ragged(random.Random(seed), 4, 2, 64, page=16)
    q, k, v = _five_d(b, 4, 2)
    mask = BlockDiagonalMask.from_seqlens(b["q_lens"], b["k_lens"], device=torch.device("cpu"))
    attend = xformers.memory_efficient_attention_forward
    with pytest.raises(ValueError, match="Expected batch_size=1 when using block-diagonal bias"):
        attend(*(torch.cat([x, x]) for x in (q, k, v)), attn_bias=mask)
    with pytest.raises(ValueError, match="Attention bias and Query/Key/Value should be on the same device"):
        attend(q, k, v, attn_bias=BlockDiagonalMask.from_seqlens(b["q_lens"], b["k_lens"], device="meta"))
    with pytest.raises(ValueError, match="should either all have the same dtype"):
        attend(q, k.half(), v, attn_bias=mask)
    with pytest.raises(ValueError, match="HINT: We don't support broadcasting"):
        attend(q, k[:, :, :, :1], v[:, :, :, :1], attn_bias=mask)
    with pytest.raises(NotImplementedError, match="No operator found"):
        attend(q.double(), k.double(), v.double(), attn_bias=mask)  # neither flash nor cutlass takes fp64
    strided = _strided(q)
    with pytest.raises(NotImplementedError, match=r"stride\(-1\) > 1"):
        attend(strided, k, v, attn_bias=mask)
    with pytest.raises(RuntimeError, match="the mask covers"):
        attend(q[:, 1:], k, v, attn_bias=BlockDiagonalMask.from_seqlens(b["q_lens"], b["k_lens"], device="cpu"))
    assert not xformers.calls
    # What flash refuses, cutlass takes: fp32, head_dim over 256, G and H that do not fold into one dim
    attend(q.float(), k.float(), v.float(), attn_bias=mask)
    wide = [x.repeat(1, 1, 1, 1, 5) for x in (q, k.contiguous(), v.contiguous())]
    attend(*wide, attn_bias=mask)
    unfoldable = q.transpose(2, 3).contiguous().transpose(2, 3)
    attend(unfoldable, k, v, attn_bias=mask)
    assert [c.op for c in xformers.calls] == ["cutlassF"] * 3


def test_xformers_double_mask_from_seqlens():
    mask = BlockDiagonalMask.from_seqlens([3, 1, 4], device=torch.device("cpu"))
    assert mask.k_seqinfo is mask.q_seqinfo
    assert mask.q_seqinfo.seqstart.dtype == torch.int32 and mask.q_seqinfo.seqstart.tolist() == [0, 3, 4, 8]
    assert (mask.q_seqinfo.min_seqlen, mask.q_seqinfo.max_seqlen) == (1, 4)
    assert BlockDiagonalMask.from_seqlens([3], [5], device="cpu").k_seqinfo.seqstart_py == [0, 5]
    with pytest.raises(AssertionError):
        BlockDiagonalMask.from_seqlens(torch.tensor([3, 1]))
