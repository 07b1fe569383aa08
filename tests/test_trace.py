"""Traces are true to the run: replayed commits rebuild the output, steps and rows match the metrics, each
step's decision is what the next step did; and tracing never changes what is decoded."""

from __future__ import annotations

import random

import msgspec
import pytest

from dengine import LLM, SamplingParams
from dengine.scheduler.policies.entropy import EntropyOptions
from dengine.trace import NUM_ALTERNATIVES, Trace

POLICIES = [("none", None), ("entropy", {"tau": 0.05, "k": 2}), ("entropy", {"refresh_on_block_start": True}),
            ("prefix", None), ("dual", None), ("dllm", {"kp": 5, "kr": 2}), ("d2cache", None)]


def _llm(folder, policy, config):
    return LLM(folder, dtype="float32", cache_policy=policy, cache_config=config, kv_cache_memory=1 << 24,
               block_size=8)


def _requests(family, seed, n=3):
    """n requests with random settings; the first uses guidance (LLaDA), the second stops at EOS."""
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(3, 9))]} for _ in range(n)]
    params = [SamplingParams(gen_length=24, block_length=rng.choice([8, 24]), steps=rng.choice([12, 24]),
                             threshold=rng.choice([None, 0.3]), temperature=rng.choice([0.0, 0.9]),
                             seed=rng.randrange(1000), stop_at_eos=i == 1 or rng.random() < 0.3,
                             cfg_scale=1.0 if family == "llada" and (i == 0 or rng.random() < 0.3) else 0.0,
                             remasking="low_confidence" if family == "llada" else "maskgit_plus",
                             trace=True) for i in range(n)]
    return prompts, params


def replay(trace: Trace) -> list[int]:
    """The generation region after every step's commits, masks where nothing was committed."""
    canvas = list(trace.prompt_token_ids) + [trace.mask_token_id] * trace.params.gen_length
    for step in trace.steps:
        for commit in step.commits:
            assert canvas[commit.position] == trace.mask_token_id, "a position is committed once"
            canvas[commit.position] = commit.token_id
    return canvas[len(trace.prompt_token_ids):]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy, config", POLICIES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(POLICIES)])
def test_trace_is_true_to_the_run(folders, family, policy, config, seed):
    prompts, params = _requests(family, seed)
    outputs = _llm(folders[family], policy, config).generate(prompts, params, use_tqdm=False)
    for out in outputs:
        trace, m = out.trace, out.metrics
        rebuilt = replay(trace)
        assert rebuilt[: len(out.token_ids)] == out.token_ids == trace.token_ids
        if not m.stopped_early:
            assert trace.mask_token_id not in rebuilt
        assert len(trace.steps) == m.nfe and [s.index for s in trace.steps] == list(range(m.nfe))
        assert sum(s.full for s in trace.steps) == m.full_recomputes
        assert sum(s.query_tokens for s in trace.steps) == m.query_tokens
        assert sum(len(s.commits) for s in trace.steps) == m.committed_tokens
        branches = 2 if trace.params.cfg_scale > 0 else 1
        total = len(trace.prompt_token_ids) + trace.params.gen_length
        for step, following in zip(trace.steps, trace.steps[1:] + [None]):
            rows = total if step.computed is None else len(step.computed)
            assert step.query_tokens == branches * rows
            assert step.full == (step.computed is None)
            assert (step.decision is None) == (following is None)
            if following is not None:
                assert step.decision.full == following.full, (step.index, step.decision)
                assert following.block >= step.block
            block_start = len(trace.prompt_token_ids) + step.block * trace.params.resolved_block_length
            for commit in step.commits:
                assert block_start <= commit.position < block_start + trace.params.resolved_block_length
                assert 0 < commit.confidence <= 1 and commit.entropy >= 0
                probs = [a.prob for a in commit.alternatives]
                assert len(probs) == NUM_ALTERNATIVES and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
                if trace.params.temperature == 0 and trace.params.cfg_scale == 0:
                    assert commit.alternatives[0].token_id == commit.token_id
                    assert commit.alternatives[0].prob == commit.confidence
        assert trace.steps[0].full and trace.steps[-1].block == trace.params.num_blocks - 1 or m.stopped_early
        if policy == "entropy":
            signals = [s.decision for s in trace.steps[:-1] if s.decision.signal is not None]
            tau = EntropyOptions(**config).resolved(trace.params).tau
            assert all(d.threshold == tau for d in signals)
            assert all(d.full for d in signals if d.signal > d.threshold)
        assert msgspec.json.decode(msgspec.json.encode(trace), type=Trace) == trace


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tracing_changes_nothing_that_is_decoded(folders, family, seed):
    prompts, params = _requests(family, seed, n=4)
    llm = _llm(folders[family], "entropy", None)
    traced = llm.generate(prompts, params, use_tqdm=False)
    plain = llm.generate(prompts, [p.replace(trace=False) for p in params], use_tqdm=False)
    assert [o.token_ids for o in traced] == [o.token_ids for o in plain]
    assert [o.metrics.query_tokens for o in traced] == [o.metrics.query_tokens for o in plain]
    assert all(o.trace is None for o in plain) and all(o.trace is not None for o in traced)


def test_trace_texts_come_from_the_tokenizer(seed):
    llm = LLM("llada-sudoku", dtype="float32", cache_policy="entropy")
    rng = random.Random(seed)
    puzzle = "/".join("".join(rng.choice("1234.") for _ in range(4)) for _ in range(4))
    out = llm.chat([{"role": "user", "content": f"Complete the sudoku {puzzle}"}],
                   SamplingParams(gen_length=24, trace=True), use_tqdm=False)[0]
    trace = out.trace
    tokenizer = llm.get_tokenizer()
    assert trace.model == "llada-sudoku" and trace.family == "llada" and trace.cache_policy == "entropy"
    assert "".join(trace.prompt_tokens).endswith(tokenizer.decode(trace.prompt_token_ids[-3:]))
    assert trace.text == out.text and set(trace.stop_token_ids) == {tokenizer.eos_token_id,
                                                                  tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    for step in trace.steps:
        for commit in step.commits:
            assert commit.text == tokenizer.decode([commit.token_id])
            assert all(a.text == tokenizer.decode([a.token_id]) for a in commit.alternatives)
