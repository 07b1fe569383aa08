"""The paged selective-recompute forward against transformers' models and the dense reference."""

from __future__ import annotations

import json
import random

import pytest
import torch

from checkpoints import VOCAB, hf_bidirectional_logits, hf_oracle, write_checkpoint
from dengine import ModelRunner, PagedKVCache, SequenceQuery, load_model
from dengine.models.layers import can_prepack, enable_fusion, num_weights, prepack_linears
from reference import dense_forward

FAMILIES = ["llada", "dream"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _scrambled_tables(rng: random.Random, lengths: list[int], block_size: int, num_blocks: int) -> list[list[int]]:
    """Disjoint, non-contiguous, shuffled block tables for sequences of the given lengths."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for length in lengths:
        need = -(-length // block_size)
        tables.append([free.pop() for _ in range(need)])
    return tables


def _runner(model, block_size: int, num_blocks: int) -> ModelRunner:
    cache = PagedKVCache(model.config, num_blocks, block_size, next(model.parameters()).dtype, "cpu")
    return ModelRunner(model, cache)


@pytest.fixture(params=FAMILIES)
def family_checkpoint(request, tmp_path, seed):
    folder, sd = write_checkpoint(tmp_path / request.param, request.param, seed=seed)
    return request.param, folder, sd


def test_full_forward_matches_transformers(family_checkpoint, seed):
    family, folder, sd = family_checkpoint
    model = load_model(folder, dtype="float32")
    oracle = hf_oracle(family, json.loads((folder / "config.json").read_text()), sd)
    rng = random.Random(seed)
    for _ in range(3):
        length = rng.randint(1, 70)
        block_size = rng.choice([1, 4, 7, 16, 32])
        tokens = torch.randint(0, VOCAB, (length,))
        table = _scrambled_tables(rng, [length], block_size, num_blocks=-(-length // block_size) + 5)[0]
        runner = _runner(model, block_size, num_blocks=max(table) + 1)
        ours = runner.run([SequenceQuery(tokens, table, torch.arange(length))])[0]
        expected = hf_bidirectional_logits(oracle, tokens)
        assert _rel_err(ours, expected) < 1e-4, (family, length, block_size)


def test_paged_layouts_agree_with_dense_reference(family_checkpoint, seed):
    family, folder, _ = family_checkpoint
    model = load_model(folder, dtype="float32")
    rng = random.Random(seed)
    length = rng.randint(20, 60)
    tokens = torch.randint(0, VOCAB, (length,))
    expected, _ = dense_forward(model, tokens)
    for block_size in rng.sample([1, 2, 3, 5, 8, 16, 64], 4):
        table = _scrambled_tables(rng, [length], block_size, num_blocks=2 * length)[0]
        runner = _runner(model, block_size, num_blocks=2 * length)
        got = runner.run([SequenceQuery(tokens, table, torch.arange(length))])[0]
        assert _rel_err(got, expected) < 1e-5, (family, block_size, table)


def test_partial_forward_uses_stale_kv_of_other_positions(family_checkpoint, seed):
    family, folder, _ = family_checkpoint
    model = load_model(folder, dtype="float32")
    rng = random.Random(seed)
    length, block_size = rng.randint(24, 64), rng.choice([4, 8, 16])
    table = _scrambled_tables(rng, [length], block_size, num_blocks=3 * length)[0]
    runner = _runner(model, block_size, num_blocks=3 * length)
    old = torch.randint(0, VOCAB, (length,))
    runner.run([SequenceQuery(old, table, torch.arange(length))])
    _, stale = dense_forward(model, old)

    new = old.clone()
    changed = torch.tensor(sorted(rng.sample(range(length), 5)))
    new[changed] = torch.randint(0, VOCAB, (5,))
    query = torch.tensor(sorted(set(changed.tolist()) | set(rng.sample(range(length), 6))))
    wanted = query[torch.randperm(query.numel())[:4]]  # logits for a subset, in arbitrary order
    got = runner.run([SequenceQuery(new, table, query, logits_positions=wanted)])[0]

    expected_all, _ = dense_forward(model, new, query=query, stale=stale)
    row = {p: i for i, p in enumerate(query.tolist())}
    expected = expected_all[[row[p] for p in wanted.tolist()]]
    assert got.shape == (4, VOCAB)
    assert _rel_err(got, expected) < 1e-5
    exact, _ = dense_forward(model, new)
    assert _rel_err(got, exact[wanted]) > 1e-3, "stale K/V should make a partial step differ from a full one"


def test_ragged_batch_equals_each_sequence_alone(family_checkpoint, seed):
    family, folder, _ = family_checkpoint
    model = load_model(folder, dtype="float32")
    rng = random.Random(seed)
    block_size, num_blocks = rng.choice([2, 8, 16]), 200
    lengths = [rng.randint(3, 50) for _ in range(4)]
    canvases = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    tables = _scrambled_tables(rng, lengths, block_size, num_blocks)

    def step_queries(canvas_list):
        queries = []
        for canvas, table in zip(canvas_list, tables):
            n = canvas.numel()
            query = torch.tensor(sorted(rng.sample(range(n), rng.randint(1, n))))
            queries.append(SequenceQuery(canvas, table, query))
        return queries

    batched, solo = _runner(model, block_size, num_blocks), _runner(model, block_size, num_blocks)
    full = [SequenceQuery(c, t, torch.arange(c.numel())) for c, t in zip(canvases, tables)]
    for runner in (batched, solo):
        runner.run(full)
    for _ in range(2):
        canvases = [torch.where(torch.rand(c.shape) < 0.3, torch.randint(0, VOCAB, c.shape), c) for c in canvases]
        queries = step_queries(canvases)
        together = batched.run(queries)
        alone = [solo.run([q])[0] for q in queries]
        for a, b in zip(together, alone):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        for layer in range(model.config.num_layers):
            assert torch.allclose(batched.kv_cache.key[layer], solo.kv_cache.key[layer], atol=1e-6)


def test_bf16_forward_tracks_fp32(family_checkpoint, seed):
    family, folder, _ = family_checkpoint
    fp32, bf16 = load_model(folder, dtype="float32"), load_model(folder, dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (40,))
    ref = _runner(fp32, 8, 8).run([SequenceQuery(tokens, list(range(5)), torch.arange(40))])[0]
    got = _runner(bf16, 8, 8).run([SequenceQuery(tokens, list(range(5)), torch.arange(40))])[0]
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, ref) < 0.05
    agree = (got.float().argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.8


def test_runner_rejects_malformed_queries(family_checkpoint):
    _, folder, _ = family_checkpoint
    model = load_model(folder, dtype="float32")
    runner = _runner(model, 4, 8)
    tokens = torch.randint(0, VOCAB, (10,))
    cases = [
        (SequenceQuery(tokens, [0, 1], torch.arange(10)), "cannot hold"),
        (SequenceQuery(tokens, [0, 1, 9], torch.arange(10)), "outside the pool"),
        (SequenceQuery(tokens, [0, 1, 2], torch.tensor([3, 10])), "within"),
        (SequenceQuery(tokens, [0, 1, 2], torch.tensor([3, 3])), "duplicates"),
        (SequenceQuery(tokens, [0, 1, 2], torch.tensor([3, 4]), torch.tensor([5])), "not computed"),
    ]
    for query, message in cases:
        with pytest.raises(ValueError, match=message):
            runner.run([query])
    with pytest.raises(ValueError, match="at least one"):
        runner.run([])


def test_dream_scores_position_i_at_i_minus_one(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path / "dream", "dream", seed=seed)
    model = load_model(folder, dtype="float32")
    assert model.config.logit_shift == 1
    assert model.query_positions_for(torch.tensor([0, 1, 5])).tolist() == [0, 0, 4]
    llada_folder, _ = write_checkpoint(tmp_path / "llada", "llada", seed=seed)
    assert load_model(llada_folder).query_positions_for(torch.tensor([0, 5])).tolist() == [0, 5]


def test_fused_elementwise_steps_compute_what_eager_ones_compute(family_checkpoint, seed):
    """compile=True: inductor's fused RMSNorm, RoPE and SwiGLU gate (here from one row on) against eager torch."""
    family, folder, _ = family_checkpoint
    model = load_model(folder, dtype="float32")
    tokens = torch.randint(0, VOCAB, (40,))
    query = [SequenceQuery(tokens, list(range(5)), torch.arange(40))]
    eager = _runner(model, 8, 8).run(query)[0]
    enable_fusion(1)
    try:
        fused = _runner(model, 8, 8).run(query)[0]
    finally:
        enable_fusion(None)
    assert _rel_err(fused, eager) < 1e-5, family


def test_prepacked_linears_compute_what_plain_ones_compute(family_checkpoint, seed):
    """bf16 on CPU: oneDNN-prepacked weights give the plain linears' results bit for bit (Dream's qkv has a
    bias), on a full and a partial step and in dLLM-Cache's V-only projection; the plain weights are freed,
    read back exactly through `weight`, and counted by num_weights."""
    family, folder, _ = family_checkpoint
    model = load_model(folder, dtype="bfloat16")
    if not can_prepack(model.lm_head.weight):
        pytest.skip("no oneDNN bf16 linear on this CPU")
    rng = random.Random(seed)
    length = rng.randint(20, 70)
    tokens = torch.randint(0, VOCAB, (length,))
    partial = torch.tensor(sorted(rng.sample(range(length), rng.randint(1, 18))))
    table = list(range(-(-length // 8)))
    x = torch.randn(rng.randint(1, 40), model.config.hidden_size).to(torch.bfloat16)

    def run():
        runner = _runner(model, 8, len(table))
        full = runner.run([SequenceQuery(tokens, table, torch.arange(length))])[0]
        part = runner.run([SequenceQuery(tokens.flip(0), table, partial)])[0]
        return full, part, model.layers[-1].attn.values(x)

    plain, count = run(), num_weights(model)
    weights = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert prepack_linears(model) == len(weights) == 4 * model.config.num_layers + 1
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert not any(name.endswith("proj.weight") or name == "lm_head.weight" for name, _ in model.named_parameters())
    assert all(torch.equal(model.get_submodule(name).weight, w) for name, w in weights.items())
    assert num_weights(model) == count
    packed = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, packed)), family
