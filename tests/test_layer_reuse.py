"""dLLM-Cache's per-layer output reuse and d2Cache's attention probe, in the paged forward, against the dense
reference, alone and in a ragged batch with sequences that compute every row."""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import VOCAB, write_checkpoint
from dengine import ModelRunner, PagedKVCache, SequenceQuery, load_model
from dengine.layer_reuse import least_similar
from dengine.model_runner import CachedOutputs
from reference import dense_forward, dense_reuse_forward, empty_reuse_state

FAMILIES = ["llada", "dream"]


@pytest.fixture(params=FAMILIES)
def model(request, tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path / request.param, request.param, seed=seed)
    return load_model(folder, dtype="float64")


def _runner(model, block_size: int, num_blocks: int) -> ModelRunner:
    return ModelRunner(model, PagedKVCache(model.config, num_blocks, block_size, torch.float64, "cpu"))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to the float32 softmax some attention paths take (relative to the largest logit)."""
    return ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def _sorted_sample(rng: random.Random, population: list[int], low: int) -> torch.Tensor:
    return torch.tensor(sorted(rng.sample(population, rng.randint(low, len(population)))), dtype=torch.long)


def test_least_similar_picks_the_rows_whose_value_turned_most():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]).view(4, 1, 2)
    new = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]).view(4, 1, 2)
    # cosines: 0.995, 0, 1, -1
    assert least_similar(new, old, 2).tolist() == [3, 1]
    assert sorted(least_similar(new, old, 9).tolist()) == [0, 1, 2, 3]
    assert least_similar(new, old, 0).numel() == 0


def test_reuse_steps_match_the_dense_reference_alone_and_batched(model, seed):
    rng = random.Random(seed)
    length, prompt = rng.randint(12, 40), rng.randint(2, 8)
    block_size = rng.choice([4, 8, 16])
    runner = _runner(model, block_size, num_blocks=64)
    per_block = runner.kv_cache.outputs_per_block
    assert per_block >= 1
    kv_blocks, out_blocks = -(-length // block_size), -(-length // per_block)
    free = list(range(64))
    rng.shuffle(free)
    table, outputs, other_table = free[:kv_blocks], free[kv_blocks : kv_blocks + out_blocks], free[-kv_blocks:]
    tokens = torch.randint(0, VOCAB, (length,))
    other = torch.randint(0, VOCAB, (length,))
    state = empty_reuse_state(model, length)
    everything = torch.arange(length)
    empty = torch.zeros(0, dtype=torch.long)
    for step in range(4):
        if step == 0:  # a full refresh stores every output
            rows, always, candidates, count = everything, everything, empty, 0
        else:
            tokens = torch.where(torch.rand(length) < 0.3, torch.randint(0, VOCAB, (length,)), tokens)
            other = torch.where(torch.rand(length) < 0.3, torch.randint(0, VOCAB, (length,)), other)
            rows = torch.cat([torch.arange(prompt) if rng.random() < 0.3 else empty, torch.arange(prompt, length)])
            extra = _sorted_sample(rng, list(range(prompt)), 1)  # passive rows past layer 0, like Dream's
            rows = torch.cat([rows, extra]).unique()
            always = rows[rows < prompt] if rng.random() < 0.5 else empty
            candidates = torch.arange(prompt, length)
            count = rng.randint(0, candidates.numel())
        expected, _ = dense_reuse_forward(model, tokens, rows, always, candidates, count, state)
        spec = CachedOutputs(outputs, always, candidates, count)
        together = runner.run([
            SequenceQuery(other, other_table, everything),
            SequenceQuery(tokens, table, rows, cached_outputs=spec),
        ])
        assert _close(together[1], expected), step
        plain, _ = dense_forward(model, other)
        assert _close(together[0], plain), step


def test_a_layer_that_recomputes_no_row_reads_every_output_from_the_cache(model, seed):
    length = 10
    runner = _runner(model, 4, num_blocks=32)
    per_block = runner.kv_cache.outputs_per_block
    table, outputs = [0, 1, 2], list(range(3, 3 + -(-length // per_block)))
    tokens = torch.randint(0, VOCAB, (length,))
    state = empty_reuse_state(model, length)
    everything, empty = torch.arange(length), torch.zeros(0, dtype=torch.long)
    runner.run([SequenceQuery(tokens, table, everything, cached_outputs=CachedOutputs(outputs, everything, empty, 0))])
    dense_reuse_forward(model, tokens, everything, everything, empty, 0, state)
    tokens[5:] = torch.randint(0, VOCAB, (5,))
    rows = torch.arange(5, length)
    got = runner.run([SequenceQuery(tokens, table, rows, cached_outputs=CachedOutputs(outputs, empty, rows, 0))])[0]
    expected, _ = dense_reuse_forward(model, tokens, rows, empty, rows, 0, state)
    assert _close(got, expected)
    assert not _close(got, dense_forward(model, tokens)[0][rows]), "reused outputs should be stale here"


def test_attention_probe_records_the_probabilities_of_the_computed_rows(model, seed):
    rng = random.Random(seed)
    length = rng.randint(8, 40)
    runner = _runner(model, 8, num_blocks=32)
    table, other_table = list(range(-(-length // 8))), list(range(16, 16 + -(-length // 8)))
    tokens = torch.randint(0, VOCAB, (length,))
    state = empty_reuse_state(model, length)
    everything, empty = torch.arange(length), torch.zeros(0, dtype=torch.long)
    for step in range(2):
        rows = everything if step == 0 else _sorted_sample(rng, list(range(length)), 1)
        query = SequenceQuery(tokens, table, rows, record_attention=True)
        runner.run([SequenceQuery(tokens, other_table, everything), query])
        _, expected = dense_reuse_forward(model, tokens, rows, rows, empty, 0, state)
        assert len(query.attention) == model.config.num_layers
        for got, want in zip(query.attention, expected):
            assert got.shape == (rows.numel(), length)
            assert torch.allclose(got, want, atol=1e-6)
            assert torch.allclose(got.sum(-1), torch.ones(rows.numel()), atol=1e-6)
        tokens = torch.where(torch.rand(length) < 0.3, torch.randint(0, VOCAB, (length,)), tokens)


def test_bad_reuse_specs_are_refused(model):
    runner = _runner(model, 4, num_blocks=32)
    tokens, everything = torch.randint(0, VOCAB, (10,)), torch.arange(10)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="not computed"):
        runner.run([SequenceQuery(tokens, [0, 1, 2], torch.arange(5),
                                  cached_outputs=CachedOutputs(list(range(3, 13)), everything, empty, 0))])
    with pytest.raises(ValueError, match="cannot hold"):
        runner.run([SequenceQuery(tokens, [0, 1, 2], everything, cached_outputs=CachedOutputs([3], everything, empty, 0))])
