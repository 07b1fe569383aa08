"""d2Cache as its authors run it: `reference` mode against the official code's decoding loop
(tests/reference_d2cache.py) step for step, the rows each step computes and the positions it commits, on
random checkpoints of both families; and the exact per-step count (`tokens_per_step`) the d2Cache framework
decodes Dream with."""

from __future__ import annotations

import random

import pytest
import torch

from dengine import LLM, SamplingParams
from reference import dense_forward
from reference_d2cache import UncomputedCommit, d2cache_generate
from reference_samplers import _dream_confidence

GEN = 24
CASES = [
    # the published setting (one block, certainty-prior decoding with sigma 10) with a small current_k
    dict(block_length=24, current_k=2),
    dict(block_length=24, current_k=4),
    dict(block_length=24, current_k=32),  # the published k: at gen 24 every mask is computed
    dict(block_length=8, current_k=4, threshold=0.5, inflate_w=4),  # semi-AR + parallel, as the paper runs it
    dict(block_length=8, current_k=3, sigma=None),  # without the certainty prior
]


def _llm(folder):
    return LLM(folder, dtype="float64", cache_policy="d2cache", kv_cache_memory=1 << 24, block_size=8)


def _params(family, case, config):
    """The engine's side of a case: one token per step unless a threshold, Dream as the official harness runs
    it (top_p 0.9, no top-k), the sampler's sigma the policy's default or off."""
    case = dict(case)
    certainty_prior = case.pop("sigma", 10.0) is not None
    config = {**config, "current_k": case.pop("current_k"), "inflate_w": case.pop("inflate_w", 0),
              "certainty_prior": certainty_prior}
    threshold = case.pop("threshold", None)
    dream = {"remasking": "maskgit_plus", "top_p": 0.9, "top_k": 0} if family == "dream" else {}
    return SamplingParams(gen_length=GEN, threshold=threshold, tokens_per_step=None if threshold else 1,
                          cache_config=config, trace=True, **case, **dream)


def _official(llm, family, case, prompt):
    case = dict(case)
    return d2cache_generate(llm.engine.model, prompt, GEN, case.pop("block_length"), sigma=case.pop("sigma", 10.0),
                            top_p=0.9 if family == "dream" else None, **case)


def _steps(out):
    return [(step.computed, sorted(commit.position for commit in step.commits)) for step in out.trace.steps]


def _compare(llm, family, case, config, seed, prompts=3):
    """(engine steps, official steps) for `prompts` random prompts the official loop decodes from computed
    logits only (it would commit from zero logits when no computed mask is left in the block)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(4 * prompts):
        prompt = torch.tensor([rng.randrange(300) for _ in range(rng.randint(3, 9))])
        try:
            tokens, steps = _official(llm, family, case, prompt)
        except UncomputedCommit:
            continue
        out = llm.generate({"prompt_token_ids": prompt.tolist()}, _params(family, case, config), use_tqdm=False)[0]
        pairs.append((_steps(out), [(s.computed, s.commits) for s in steps], out.token_ids, tokens.tolist()))
        if len(pairs) == prompts:
            return pairs
    raise AssertionError(f"only {len(pairs)} of {4 * prompts} prompts decode from computed logits")


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_mode_is_the_official_loop_step_for_step(folders, family, case, seed):
    for got, expected, tokens, official_tokens in _compare(_llm(folders[family]), family, case,
                                                           {"reference": True}, seed):
        assert got == expected
        assert tokens == official_tokens


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_method_departs_from_the_official_loop(folders, family, seed):
    """Without reference, the confidence updates, the window is block-aligned and Dream's row before the answer
    is chosen before the rollout: with a small current_k some step computes other rows."""
    pairs = _compare(_llm(folders[family]), family, CASES[0], {}, seed, prompts=4)
    assert any(got != expected for got, expected, _, _ in pairs)


def _one_per_step(model, prompt, gen_length, block_length, dream):
    """The d2Cache framework's vanilla loop with num_transfer_tokens 1 and no cache: a full forward per step,
    the block's most confident mask committed (Dream: top_p 0.9, no top-k, float32)."""
    mask = model.config.mask_token_id
    x = torch.cat([prompt, torch.full((gen_length,), mask)])
    p = prompt.numel()
    for b in range(gen_length // block_length):
        start, end = p + b * block_length, p + (b + 1) * block_length
        while bool((x[start:end] == mask).any()):
            logits = dense_forward(model, x)[0]
            if dream:
                logits = torch.cat([logits[:1], logits[:-1]])
            logits[:, mask] = -torch.inf
            if dream:
                confidence, tokens = _dream_confidence(logits, "maskgit_plus", 0.0, 0.9, None)
            else:
                confidence, tokens = logits.double().softmax(-1).max(-1)
            candidates = (x[start:end] == mask).nonzero().flatten() + start
            best = candidates[confidence[candidates].argmax()]
            x[best] = tokens[best]
    return x[p:]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("block_length", [8, 24])
def test_tokens_per_step_one_commits_exactly_one_token_a_step(folders, family, block_length, seed):
    llm = LLM(folders[family], dtype="float64", kv_cache_memory=1 << 24, block_size=8)
    rng = random.Random(seed)
    prompt = torch.tensor([rng.randrange(300) for _ in range(rng.randint(3, 9))])
    dream = family == "dream"
    params = SamplingParams(gen_length=GEN, block_length=block_length, tokens_per_step=1, trace=True,
                            **({"remasking": "maskgit_plus", "top_p": 0.9, "top_k": 0} if dream else {}))
    out = llm.generate({"prompt_token_ids": prompt.tolist()}, params, use_tqdm=False)[0]
    assert [len(step.commits) for step in out.trace.steps] == [1] * GEN
    assert out.token_ids == _one_per_step(llm.engine.model, prompt, GEN, block_length, dream).tolist()
    if dream:  # Dream's own schedule at steps == gen_length commits nothing at a block's first step
        schedule = llm.generate({"prompt_token_ids": prompt.tolist()}, params.replace(tokens_per_step=None),
                                use_tqdm=False)[0]
        assert len(schedule.trace.steps[0].commits) == 0


def test_tokens_per_step_counts_and_bad_combinations(folders):
    llm = LLM(folders["llada"], dtype="float64", kv_cache_memory=1 << 24, block_size=8)
    params = SamplingParams(gen_length=16, block_length=8, tokens_per_step=3, trace=True)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0]
    assert [len(step.commits) for step in out.trace.steps] == [3, 3, 2, 3, 3, 2]  # the remainder last
    for bad in (dict(steps=8), dict(threshold=0.9), dict(factor=1.0), dict(tokens_per_step=0)):
        with pytest.raises(ValueError, match="tokens_per_step"):
            SamplingParams(**{"tokens_per_step": 1, **bad})
    with pytest.raises(ValueError, match="origin"):
        SamplingParams(tokens_per_step=1, remasking="origin")
