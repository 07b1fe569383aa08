"""The engine's samplers and Fast-dLLM caches against the published algorithms, token for token (T=0)."""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import write_checkpoint
from conftest import SEED
from dengine import LLM, SamplingParams
from dengine.decoding import factor_count, llada_transfer_schedule, threshold_count, top_k_filter, top_p_filter
from reference import dense_forward
from reference_samplers import dream_generate, llada_generate

# Sharper attention and output distributions than plain random weights: positions then differ from each
# other, approximate caching changes the tokens, and confident predictions exist for threshold / factor.
HEAD_SCALE, ATTN_SCALE = 4.0, 6.0
AUTO = "auto"  # threshold / factor chosen from the model's first-step confidences (see _resolve)
OFFICIAL_DREAM_TOP_K = 50  # what diffusion_generate inherits from the model config (transformers 4.46)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    seed = SEED
    out = {}
    for family in ("llada", "dream"):
        folder, _ = write_checkpoint(tmp_path_factory.mktemp(family), family, seed=seed, head_scale=HEAD_SCALE,
                                     attn_scale=ATTN_SCALE)
        out[family] = folder
    return out


def _engine(folder, policy="none"):
    # float64 keeps the engine's and the reference's confidences apart only at exact ties.
    return LLM(folder, dtype="float64", cache_policy=policy, kv_cache_memory=1 << 24, block_size=8)


def _prompt(rng, length):
    return torch.tensor([rng.randrange(0, 300) for _ in range(length)])


def _resolve(case, model, prompt):
    """Replace AUTO threshold / factor by values that commit 2-4 tokens at the first step of block 0."""
    case = dict(case)
    if AUTO not in (case.get("threshold"), case.get("factor")):
        return case
    canvas = torch.cat([prompt, torch.full((case["gen_length"],), model.config.mask_token_id)])
    logits = dense_forward(model, canvas)[0]
    start = prompt.numel()
    rows = torch.arange(start, start + case["block_length"]) - model.config.logit_shift
    logits = logits[rows]
    if model.config.model_type == "dream":  # the confidences Dream's sampler ranks: after its top-k filter
        top_k = _reference_top_k(case)["top_k"]
        logits = logits if top_k is None else top_k_filter(logits, top_k)
    confidence = logits.double().softmax(-1).max(-1).values.sort(descending=True).values
    # Midpoints between the 3rd and 4th confidences, far from rounding differences between forwards.
    if case.get("threshold") == AUTO:
        case["threshold"] = float(confidence[2] + confidence[3]) / 2  # the top 3 pass
    else:
        case["factor"] = float(4 * (1 - confidence[2]) + 5 * (1 - confidence[3])) / 2  # n = 3 passes, 4 fails
    return case


LLADA_CASES = [
    dict(gen_length=16, block_length=16, steps=16),
    dict(gen_length=24, block_length=8, steps=12),
    dict(gen_length=24, block_length=8, steps=24, threshold=AUTO),
    dict(gen_length=24, block_length=8, steps=24, factor=AUTO),
    dict(gen_length=16, block_length=8, steps=6, logits_eos_inf=True),
]


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("case", LLADA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_llada_matches_reference(models, cache, case, seed):
    llm = _engine(models["llada"], cache or "none")
    rng = random.Random(seed)
    prompt = _prompt(rng, rng.randint(3, 12))
    case = _resolve(case, llm.engine.model, prompt)
    out = llm.generate({"prompt_token_ids": prompt.tolist()}, SamplingParams(**case), use_tqdm=False)[0]
    expected = llada_generate(llm.engine.model, prompt, cache=cache, **case)
    assert out.token_ids == expected.tolist()
    if cache is None and ("threshold" in case or "factor" in case):
        assert out.metrics.nfe < case["gen_length"], "the parallel rule should commit several tokens in a step"
    assert out.metrics.committed_tokens == case["gen_length"]
    if cache is None:
        assert out.metrics.full_recomputes == out.metrics.nfe
    else:
        assert out.metrics.full_recomputes == case["gen_length"] // case["block_length"]


def test_llada_classifier_free_guidance_matches_reference(models, seed):
    llm = _engine(models["llada"])
    rng = random.Random(seed)
    prompt = _prompt(rng, 6)
    params = SamplingParams(gen_length=16, block_length=8, steps=8, cfg_scale=1.5)
    out = llm.generate({"prompt_token_ids": prompt.tolist()}, params, use_tqdm=False)[0]
    expected = llada_generate(llm.engine.model, prompt, gen_length=16, block_length=8, steps=8, cfg_scale=1.5)
    assert out.token_ids == expected.tolist()
    assert out.metrics.query_tokens == 2 * 8 * (6 + 16)  # two branches, full canvas, 8 steps


DREAM_CASES = [
    dict(gen_length=16, block_length=16, steps=16, alg="maskgit_plus"),
    dict(gen_length=16, block_length=16, steps=8, alg="topk_margin"),
    dict(gen_length=24, block_length=8, steps=12, alg="entropy"),
    dict(gen_length=16, block_length=8, steps=8, alg="maskgit_plus", top_k=5, top_p=0.9),
    dict(gen_length=24, block_length=8, steps=24, alg="maskgit_plus", threshold=AUTO),
    # the filter turned off (vLLM's convention), against the official code called with top_k=None
    dict(gen_length=16, block_length=16, steps=16, alg="maskgit_plus", top_k=-1),
    dict(gen_length=16, block_length=8, steps=8, alg="entropy", top_k=0),
    dict(gen_length=24, block_length=8, steps=24, alg="maskgit_plus", threshold=AUTO, top_k=-1),
]


def _reference_top_k(case: dict) -> dict:
    """The engine's top_k as the official code takes it: unset means its inherited 50, 0 / -1 (off) None."""
    top_k = case.get("top_k", OFFICIAL_DREAM_TOP_K)
    return {**case, "top_k": None if top_k in (0, -1) else top_k}


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("case", DREAM_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dream_matches_reference(models, cache, case, seed):
    llm = _engine(models["dream"], cache or "none")
    rng = random.Random(seed)
    prompt = _prompt(rng, rng.randint(3, 12))
    case = _resolve(case, llm.engine.model, prompt)
    alg = case.pop("alg")
    params = SamplingParams(remasking=alg, **case)
    out = llm.generate({"prompt_token_ids": prompt.tolist()}, params, use_tqdm=False)[0]
    expected = dream_generate(llm.engine.model, prompt, alg=alg, cache=cache, **_reference_top_k(case))
    assert out.token_ids == expected.tolist()
    if cache is None and "threshold" not in case:
        # the official schedule: exactly `steps` forwards, a step whose count rounds to 0 included
        assert out.metrics.nfe == case["steps"]


@pytest.mark.parametrize("case", [
    dict(alg="origin"),
    dict(alg="origin", temperature=0.7),
    dict(alg="origin", temperature=0.7, top_k=-1, top_p=0.9),
    dict(alg="maskgit_plus", temperature=0.5),
    dict(alg="entropy", temperature=1.0, top_k=8),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dream_random_draws_match_reference_with_the_same_random_stream(models, seed, case):
    """origin's coins and the sampled tokens (Categorical in the official code) come from the same stream."""
    llm = _engine(models["dream"])
    prompt = _prompt(random.Random(seed), 5)
    case = dict(case)
    alg = case.pop("alg")
    params = SamplingParams(gen_length=16, block_length=8, steps=8, remasking=alg, seed=seed, **case)
    out = llm.generate({"prompt_token_ids": prompt.tolist()}, params, use_tqdm=False)[0]
    torch.manual_seed(seed)  # the official code draws from torch's global stream
    expected = dream_generate(llm.engine.model, prompt, 16, 8, 8, alg=alg, **_reference_top_k(case))
    assert out.token_ids == expected.tolist()


def _top50_flip_logits(vocab: int = 320) -> torch.Tensor:
    """Two positions whose order by confidence flips under Dream's top-50 filter.

    Row 0: top logit 3, 49 tokens at 0, the other tail at -0.5: full-vocabulary confidence 0.086, but 0.29
    once the tail is cut. Row 1: top logit 2, 49 tokens at 0, no tail mass: 0.131 either way.
    """
    logits = torch.full((2, vocab), -30.0)
    logits[0, 50:] = -0.5
    logits[:, 1:50] = 0.0
    logits[0, 0], logits[1, 0] = 3.0, 2.0
    return logits


@pytest.mark.parametrize("top_k, committed", [(None, 0), (50, 0), (-1, 1), (0, 1), (200, 1)])
def test_dream_default_top_k_changes_which_position_commits(top_k, committed):
    from dengine.decoding import Decoder

    logits = _top50_flip_logits()
    full = logits.softmax(-1).max(-1).values
    assert full[1] > full[0], "without the filter the second position is the more confident"
    # one commit at the schedule's last step would take both; threshold 0.2 separates them
    params = SamplingParams(gen_length=2, steps=2, top_k=top_k, threshold=0.2, remasking="maskgit_plus")
    decoder = Decoder(params, "dream", mask_token_id=310, eos_token_id=311, eot_token_id=None,
                      generator=torch.Generator().manual_seed(0))
    outcome = decoder.step(torch.tensor([10, 11]), logits, block_step=0, head_only=False)
    assert outcome.positions.tolist() == [10 + committed]


def test_temperature_sampling_is_seeded(models):
    for family, params in (
        ("llada", SamplingParams(gen_length=16, steps=8, temperature=0.8, seed=7)),
        ("dream", SamplingParams(gen_length=16, steps=8, temperature=0.8, top_p=0.95, seed=7, remasking="entropy")),
        ("llada", SamplingParams(gen_length=16, steps=8, remasking="random", seed=7)),
    ):
        llm = _engine(models[family])
        first = llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0].token_ids
        again = llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0].token_ids
        assert first == again and llm.engine.config.mask_token_id not in first


def test_schedule_and_parallel_rules_by_hand():
    assert llada_transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert llada_transfer_schedule(3, 5) == [1, 1, 1, 0, 0]
    conf = torch.tensor([0.2, 0.95, 0.91, 0.5])
    assert sorted(threshold_count(conf, 0.9).tolist()) == [1, 2]
    assert threshold_count(torch.tensor([0.2, 0.3]), 0.9).tolist() == [1]  # none passes: the top one
    # sorted: .95 .91 .5 .2 -> (n+1)(1-c): 2*.05=.1, 3*.09=.27, 4*.5=2, 5*.8=4
    assert sorted(factor_count(conf, 1.0).tolist()) == [1, 2]
    assert sorted(factor_count(conf, 2.5).tolist()) == [1, 2, 3]
    assert factor_count(torch.tensor([0.1, 0.2]), 0.01).tolist() == [1]  # at least one
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert (top_k_filter(logits, 2)[0, 2:] < -1e30).all() and top_k_filter(logits, 2)[0, :2].tolist() == [3.0, 2.0]
    probs = logits.softmax(-1)[0]  # .644 .237 .087 .032
    kept = top_p_filter(logits, 0.7)[0] > -1e30
    assert kept.tolist() == [True, True, False, False]
    assert (top_p_filter(logits, 0.5)[0] > -1e30).tolist() == [True, False, False, False]
    assert probs[0] > 0.5


def test_confidence_eos_eot_inf_never_commits_eos_or_eot_first():
    from dengine.decoding import Decoder

    eos, eot = 7, 8
    logits = torch.full((3, 10), -5.0)
    logits[0, eos] = 9.0  # most confident, but EOS
    logits[1, eot] = 8.0  # next, but EOT
    logits[2, 3] = 2.0  # least confident ordinary token
    candidates = torch.tensor([20, 21, 22])
    for guarded, expected in ((False, 20), (True, 22)):
        params = SamplingParams(gen_length=3, steps=3, confidence_eos_eot_inf=guarded)
        decoder = Decoder(params, "llada", 9, eos, eot, torch.Generator().manual_seed(0))
        decoder.start_block(3)
        outcome = decoder.step(candidates, logits, block_step=0, head_only=False)
        assert outcome.positions.tolist() == [expected]
    params = SamplingParams(gen_length=3, steps=3, logits_eos_inf=True)
    decoder = Decoder(params, "llada", 9, eos, eot, torch.Generator().manual_seed(0))
    decoder.start_block(3)
    outcome = decoder.step(candidates, logits, block_step=2, head_only=False)
    assert eos not in outcome.tokens.tolist() and outcome.positions.tolist() == [21]


def test_hot_llada_sampling_never_draws_an_excluded_token(seed):
    """At the highest temperature a -inf token's Gumbel score is 0 / 0 = NaN whenever its noise term underflows;
    NaN must not win the draw (it committed MASK, a position then committed twice)."""
    from dengine.decoding import Decoder
    from dengine.sampling_params import MAX_TEMPERATURE

    vocab, mask, eos = 12, 10, 11
    logits = torch.randn((1, vocab), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = SamplingParams(gen_length=1, steps=1, temperature=MAX_TEMPERATURE, logits_eos_inf=True)
    underflowing = []
    for stream in range(seed % 1000, seed % 1000 + 200_000):  # seeds whose noise sends MASK's or EOS's term to 0
        noise = torch.rand((1, vocab), dtype=torch.float64, generator=torch.Generator().manual_seed(stream))
        if ((-noise[0, [mask, eos]].log()) ** MAX_TEMPERATURE == 0).any():
            underflowing.append(stream)
            if len(underflowing) == 3:
                break
    assert len(underflowing) == 3
    for stream in underflowing:
        decoder = Decoder(params, "llada", mask, eos, None, torch.Generator().manual_seed(stream))
        decoder.start_block(1)
        outcome = decoder.step(torch.tensor([5]), logits, block_step=0, head_only=False)
        assert outcome.tokens.item() not in (mask, eos)
