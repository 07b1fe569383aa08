"""dLLM-Cache and d2Cache as engine policies, and certainty-prior decoding: forced refreshes equal exact
decoding, the selection rules on hand-checked cases, and the layer outputs' place in the KV pool."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from dengine import LLM, SamplingParams
from dengine.decoding import Decoder, certainty_density
from dengine.scheduler.policies.d2cache import D2Cache, inflate, nucleus, rollout_importance
from dengine.scheduler.policies import make_policy
from reference_d2cache import rollout as dense_rollout

SAMPLERS = [
    dict(gen_length=24, block_length=8, steps=24),
    dict(gen_length=24, block_length=8, steps=12, threshold=0.3),
]


def _llm(folder, policy="none", **kwargs):
    kwargs.setdefault("kv_cache_memory", 1 << 24)
    return LLM(folder, dtype="float64", cache_policy=policy, block_size=8, **kwargs)


def _prompt(seed, n=7):
    rng = random.Random(seed)  # one generator per prompt: n different tokens, not n copies of one
    return {"prompt_token_ids": [rng.randrange(300) for _ in range(n)]}


def _sampler(family, sampler):
    return {**sampler, "remasking": "maskgit_plus"} if family == "dream" else sampler


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=["one-per-step", "threshold"])
@pytest.mark.parametrize("policy, config", [
    ("dllm", {"kp": 1, "kr": 1}),
    ("d2cache", {"current_k": 10_000, "rollout_p": 1.0}),
    ("d2cache", {"current_k": 10_000, "rollout_p": 1.0, "frozen_confidence": True}),
], ids=["dllm", "d2cache", "d2cache-frozen"])
def test_refreshing_everything_equals_exact_decoding(folders, family, sampler, policy, config, seed):
    sampler = _sampler(family, sampler)
    # d2cache commits by confidence * density with its sigma (10) when the request sets none, as its authors run it
    prior = {"sigma": 10.0} if policy == "d2cache" else {}
    exact = _llm(folders[family]).generate(_prompt(seed), SamplingParams(**sampler, **prior), use_tqdm=False)[0]
    params = SamplingParams(**sampler, cache_config=config)
    out = _llm(folders[family], policy).generate(_prompt(seed), params, use_tqdm=False)[0]
    assert out.token_ids == exact.token_ids
    assert out.metrics.nfe == exact.metrics.nfe and out.metrics.cache_policy == policy


@pytest.mark.parametrize("policy, config", [("dllm", {"kp": 1, "kr": 1}),
                                            ("d2cache", {"current_k": 10_000, "rollout_p": 1.0})])
def test_guidance_twin_canvas_reuses_its_own_outputs(folders, policy, config, seed):
    """CFG's unconditional canvas has its own K/V and layer-output blocks; refreshed fully it equals none."""
    params = SamplingParams(gen_length=16, block_length=8, cfg_scale=1.0, sigma=2.0)
    exact = _llm(folders["llada"]).generate(_prompt(seed), params, use_tqdm=False)[0]
    llm = _llm(folders["llada"], policy, cache_config=config)
    assert llm.generate(_prompt(seed), params, use_tqdm=False)[0].token_ids == exact.token_ids
    manager = llm.engine.kv_manager
    assert manager.num_free_blocks == manager.pool.num_blocks


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_caches_compute_fewer_rows_and_reuse_changes_tokens_somewhere(folders, family, seed):
    """The defaults compute fewer query tokens than exact decoding; the least refreshing settings decode
    some prompt differently on these sharp random models (a cache that changed nothing would be suspicious)."""
    sampler = SamplingParams(**_sampler(family, dict(gen_length=32, block_length=8, steps=32)))
    prompts = [_prompt(seed + i, 9) for i in range(24)]
    exact = _llm(folders[family]).generate(prompts, sampler, use_tqdm=False)
    least = {"dllm": {"rho": 0.0, "kp": 1000, "kr": 1000},
             "d2cache": {"current_k": 1, "rollout_p": 0.0, "certainty_prior": False}}  # the cache alone differs
    for policy, config in least.items():
        outs = _llm(folders[family], policy).generate(prompts, sampler, use_tqdm=False)
        assert all(o.metrics.avg_query_tokens < e.metrics.avg_query_tokens for o, e in zip(outs, exact))
        assert all(o.metrics.full_recomputes == 1 for o in outs)
        stale = _llm(folders[family], policy, cache_config=config)
        outs = stale.generate(prompts, sampler, use_tqdm=False)
        differ = any(o.token_ids != e.token_ids for o, e in zip(outs, exact))
        for round_ in range(1, 3):  # on a rare draw all 24 agree (seen once in a full run): more prompts, not a pass
            if differ:
                break
            more = [_prompt(seed + 24 * round_ + i, 9) for i in range(24)]
            reference = _llm(folders[family]).generate(more, sampler, use_tqdm=False)
            differ = any(o.token_ids != e.token_ids
                         for o, e in zip(stale.generate(more, sampler, use_tqdm=False), reference))
        assert differ, policy


def test_dllm_refresh_schedule_and_query_sets():
    policy = make_policy("dllm", {"kp": 3, "kr": 2, "rho": 0.5})
    seq = SimpleNamespace(prompt_len=4, num_tokens=12)
    seen = []
    for _ in range(7):
        plan = policy.plan(seq)
        always, candidates, count = policy.reuse(seq)
        seen.append((plan is None, always.tolist(), candidates.tolist(), count))
        policy.observe(seq, None, False)
    prompt, response = list(range(4)), list(range(4, 12))
    assert seen == [
        (True, prompt + response, [], 0),  # step 0: both refresh
        (False, [], response, 4),  # neither: V for all 8 response rows, int(0.5 * 8) recomputed per layer
        (False, response, [], 0),  # response refresh (step 2)
        (True, prompt, response, 4),  # prompt refresh only (step 3)
        (False, response, [], 0),
        (False, [], response, 4),
        (True, prompt + response, [], 0),  # step 6: both
    ]


def test_layer_outputs_take_blocks_from_the_kv_pool(folders):
    llm = _llm(folders["llada"], "dllm")
    manager = llm.engine.kv_manager
    per_block = llm.engine.kv_cache.outputs_per_block
    assert per_block == 8 * llm.engine.config.kv_dim // llm.engine.config.hidden_size
    assert manager.blocks_needed(30, layer_outputs=True) == math.ceil(30 / 8) + math.ceil(30 / per_block)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3, 4, 5, 6]}, SamplingParams(gen_length=24, block_length=8))
    engine.add_request("b", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(gen_length=8, cache_policy="none"))
    engine.step()
    used = manager.pool.num_blocks - manager.num_free_blocks
    assert used == manager.blocks_needed(30, layer_outputs=True) + manager.blocks_needed(11)
    while engine.has_unfinished_requests():
        engine.step()
    assert manager.num_free_blocks == manager.pool.num_blocks


def test_admission_counts_the_layer_outputs(folders):
    # a pool exactly as large as one sequence's K/V is too small once its layer outputs count
    engine = _llm(folders["llada"], kv_cache_memory=4 * 16384).engine
    assert engine.kv_manager.pool.num_blocks == 4
    params = SamplingParams(gen_length=30, cache_policy="dllm")
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("x", {"prompt_token_ids": [1, 2]}, params)
    engine.add_request("y", {"prompt_token_ids": [1, 2]}, params.replace(cache_policy="none"))


def test_certainty_density_by_hand():
    # G = 2, known = [no, yes]: the canvas extends to j = -2..3 with known = [1, 1, 0, 1, 1, 1]; the normaliser
    # is the kernel's whole mass, over the offsets -6..5 (3G either side, the kernel d2Cache's reference builds)
    k = lambda d: math.exp(-(d**2) / 2)  # noqa: E731
    known = [1, 1, 0, 1, 1, 1]
    mass = sum(k(d) for d in range(-6, 6))
    expected = [sum(k(i - j) * m for j, m in zip(range(-2, 4), known)) / mass for i in (0, 1)]
    got = certainty_density(torch.tensor([False, True]), sigma=1.0)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # the right side is unknown while the last position is: density falls off towards the end
    falling = certainty_density(torch.tensor([True, False, False, False, False]), sigma=1.0)
    assert torch.all(falling[1:] < falling[:-1]) and falling[-1] < 0.3
    # a tiny sigma sees only the position itself
    mixed = torch.tensor([True, False, True, True, False, True])
    assert torch.allclose(certainty_density(mixed, sigma=0.05), mixed.double())


def _official_density(known: torch.Tensor, sigma: float) -> torch.Tensor:
    """d2Cache's certainty_density (src/utils/common.py) in float64: the extended canvas and a 6G circular
    kernel multiplied in the Fourier domain, divided by the kernel convolved with ones (its whole mass)."""
    g = known.numel()
    padded = torch.nn.functional.pad(known.double(), (g, g), value=1.0)
    if not bool(known[-1]):
        padded[2 * g :] = 0.0
    dist = torch.cat([torch.arange(3 * g), torch.arange(-3 * g, 0)]).double()
    kernel = torch.fft.fft(torch.exp(-(dist**2) / (2 * sigma**2)), n=6 * g)
    weighted = torch.fft.ifft(torch.fft.fft(torch.nn.functional.pad(padded, (0, 3 * g)), n=6 * g) * kernel).real
    mass = torch.fft.ifft(torch.fft.fft(torch.ones(6 * g, dtype=torch.float64)) * kernel).real
    return weighted[g : 2 * g] / mass[g : 2 * g]


def test_certainty_density_is_normalised_by_the_whole_kernel_as_the_official_code(seed):
    rng = random.Random(seed)
    for g, sigma in [(24, 10.0), (256, 10.0), (7, 0.7), (40, 3.0), (5, 50.0)]:
        known = torch.tensor([rng.random() < 0.5 for _ in range(g)])
        for case in (known, torch.ones(g, dtype=torch.bool), torch.zeros(g, dtype=torch.bool)):
            assert torch.allclose(certainty_density(case, sigma), _official_density(case, sigma), atol=1e-12)
    # everything known: 1 where the window holds the whole kernel; at gen 24 and sigma 10 the edges lose ~0.7%
    # of the mass (the previous normaliser, the mass inside the window, made them exactly 1)
    edges = certainty_density(torch.ones(24, dtype=torch.bool), 10.0)
    assert 0.99 < float(edges[0]) < 0.995 and float(edges[0]) == pytest.approx(float(edges[-1]))
    assert float(edges[11]) > float(edges[0])
    everything = torch.ones(256, dtype=torch.bool)
    assert torch.allclose(certainty_density(everything, 10.0), everything.double())


def test_rollout_importance_by_hand_and_against_the_dense_product(seed):
    # two positions, one layer, row 0 attends half/half: W = [[0.75, 0.25], [0, 1]], column sums [0.75, 1.25]
    got = rollout_importance(torch.tensor([0]), [torch.tensor([[0.5, 0.5]])], 2)
    assert torch.allclose(got, torch.tensor([0.75, 1.25], dtype=torch.float64))
    generator = torch.Generator().manual_seed(seed)
    length, layers = 9, 3
    rows = torch.tensor(sorted(random.Random(seed).sample(range(length), 4)))
    probs = [torch.rand(rows.numel(), length, generator=generator).softmax(-1) for _ in range(layers)]
    assert torch.allclose(rollout_importance(rows, probs, length), dense_rollout(rows, probs, length).sum(0),
                          atol=1e-12)


def test_nucleus_and_inflation_by_hand():
    importance = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    everything = torch.ones(4, dtype=torch.bool)
    assert nucleus(importance, everything, 0.5).tolist() == [0]  # 0.4 <= 0.5 < 0.7
    assert nucleus(importance, everything, 0.75).tolist() == [0, 1]
    assert nucleus(importance, everything, 0.01).tolist() == [0]  # at least one
    not_first = torch.tensor([False, True, True, True])
    assert nucleus(importance, not_first, 0.5).tolist() == [1]  # 3/6 = 0.5
    assert nucleus(importance, not_first, 0.9).tolist() == [1, 2]  # 0.5, 0.83, then 1.0
    assert nucleus(importance, not_first, 1.0).tolist() == [1, 2, 3]
    assert nucleus(importance, torch.zeros(4, dtype=torch.bool), 0.5).numel() == 0
    chosen = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert inflate(chosen, 3).int().tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 0]
    assert inflate(chosen, 4).int().tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]  # the ends never fill
    assert inflate(chosen, 0).tolist() == chosen.tolist()


def _fake_sequence(**fields):
    return SimpleNamespace(prompt_len=2, block_start=6, block_end=10, num_tokens=14, mask_id=0,
                           params=SimpleNamespace(resolved_block_length=4), **fields)


def test_d2cache_mask_selection_biases_the_block_and_ends_its_window_at_a_block_boundary():
    # prompt 2, generation 12 in blocks of 4; the current block is generated indices 4..7
    seq = _fake_sequence()
    remaining = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    confidence = torch.tensor([0, 0, 0, 0, 0, 0.01, 0, 0.8, 0.5, 0.9, 0.9, 0.9], dtype=torch.float64)

    def choose(k, unit=None, confidence=confidence):
        policy = D2Cache(D2Cache.parse_options({"current_k": k, "sigma": 1.0}))
        policy.confidence = confidence.clone()
        return sorted(policy._choose_masks(seq, remaining, unit).tolist())

    # k 3: the window runs to the end of the block holding the 3rd mask (index 8), i.e. 4..11. Mask 5 is
    # the least confident but in the block; 8 beats the more confident 9..11 by density (nearer known 6).
    assert choose(3) == [5, 7, 8]
    assert choose(2) == [5, 7]  # the window is the block alone
    assert choose(100) == [5, 7, 8, 9, 10, 11]  # fewer masks than k: every one
    # reference: the window ends at a multiple of the masks the block had before the step (here 3), 4..8, so
    # an unconfident 8 is chosen where the block-aligned window prefers 9
    unconfident = confidence.clone()
    unconfident[8] = 0.001
    assert choose(3, confidence=unconfident) == [5, 7, 9]
    assert choose(3, unit=3, confidence=unconfident) == [5, 7, 8]


def test_d2cache_confidence_is_updated_or_frozen_at_step_0():
    logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    decoder = Decoder(SamplingParams(), "llada", 0, 1, None, torch.Generator())
    for options, frozen in (({}, False), ({"frozen_confidence": True}, True), ({"reference": True}, True)):
        policy = D2Cache(D2Cache.parse_options(options))
        policy._update_confidence(_fake_sequence(decoder=decoder, last_scored=(torch.tensor([2, 3]), logits)))
        first = policy.confidence.clone()
        # MASK (id 0) is excluded: softmax over ids 1, 2
        assert first[:2].tolist() == pytest.approx([math.exp(2) / (math.exp(2) + 1), 0.5])
        policy._update_confidence(_fake_sequence(decoder=decoder, last_scored=(torch.tensor([3]), logits[:1])))
        assert policy.confidence[1].item() == pytest.approx(0.5 if frozen else first[0].item())


def test_d2cache_confidence_is_the_samplers_top_probability():
    """Decoder.top_probability: MASK (id 0) excluded; Dream's after temperature, top-p and top-k."""
    logits = torch.tensor([[5.0, 2.0, 0.0, 1.0]])

    def top(family, **params):
        decoder = Decoder(SamplingParams(**params), family, 0, 3, None, torch.Generator())
        return float(decoder.top_probability(logits)[0])

    e = math.exp
    assert top("llada") == pytest.approx(e(2) / (e(2) + 1 + e(1)))
    assert top("dream") == top("dream", top_k=0) == pytest.approx(e(2) / (e(2) + 1 + e(1)), rel=1e-6)
    assert top("dream", top_k=2) == pytest.approx(e(2) / (e(2) + e(1)), rel=1e-6)
    assert top("dream", top_p=0.6) == 1.0  # the top token alone holds 0.67 >= 0.6
    assert top("dream", temperature=2.0) == pytest.approx(e(1) / (e(1) + 1 + e(0.5)), rel=1e-6)


def test_llada_softmax_in_float32_as_the_cache_papers_samplers():
    """softmax_dtype float32: LLaDA's confidences and committed distributions from a float32 softmax, as the
    dLLM-Cache and d2Cache samplers take them; float64 (LLaDA's generate.py) by default."""
    logits = torch.randn(5, 40, dtype=torch.float64) * 4
    for dtype in ("float64", "float32"):
        decoder = Decoder(SamplingParams(softmax_dtype=dtype), "llada", 0, 3, None, torch.Generator())
        outcome = decoder.step(torch.arange(5), logits, 0, head_only=False)
        expected = logits.to(getattr(torch, dtype)).index_fill(1, torch.tensor([0]), -torch.inf).softmax(-1)
        assert outcome.probs.dtype == expected.dtype
        assert torch.equal(outcome.probs, expected[outcome.positions])
        assert torch.allclose(decoder.top_probability(logits), expected.max(-1).values.double())
    with pytest.raises(ValueError, match="softmax_dtype"):
        SamplingParams(softmax_dtype="bfloat16")
    with pytest.raises(ValueError, match="LLaDA-only"):
        SamplingParams(softmax_dtype="float32").check_family("dream")


def test_d2cache_turns_on_the_certainty_prior_unless_told_not_to():
    assert make_policy("d2cache").default_sigma(SamplingParams()) == 10.0
    assert make_policy("d2cache", {"sigma": 3.0}).default_sigma(SamplingParams()) == 3.0
    assert make_policy("d2cache", {"certainty_prior": False}).default_sigma(SamplingParams()) is None
    assert make_policy("d2cache").default_sigma(SamplingParams(remasking="origin")) is None  # no confidence
    assert all(make_policy(name).default_sigma(SamplingParams()) is None for name in ("none", "entropy", "dllm"))


def test_certainty_prior_decoding_commits_by_confidence_times_density(folders, seed):
    """sigma: no blocks, and the commits follow confidence * density (almost left to right)."""
    llm = _llm(folders["llada"])
    plain = SamplingParams(gen_length=32, steps=32)
    outs = {sigma: llm.generate(_prompt(seed, 5), plain.replace(sigma=sigma), use_tqdm=False)[0]
            for sigma in (None, 0.5, 1e6)}
    # an enormous sigma makes the density nearly uniform: the same choices as plain confidence
    assert outs[1e6].token_ids == outs[None].token_ids
    for policy in ("entropy", "d2cache", "dllm", "dual"):
        out = llm.generate(_prompt(seed, 5), plain.replace(sigma=0.5, cache_policy=policy), use_tqdm=False)[0]
        assert len(out.token_ids) == 32 and out.finished


def test_sigma_commits_the_known_neighbourhood_first(folders, seed, monkeypatch):
    from dengine.scheduler.sequence import Sequence

    order = []
    real_apply = Sequence.apply

    def recording_apply(self, queries, logits):
        outcome = real_apply(self, queries, logits)
        order.extend(outcome.positions.tolist())
        return outcome

    monkeypatch.setattr(Sequence, "apply", recording_apply)
    llm = _llm(folders["llada"])
    llm.generate(_prompt(seed, 5), SamplingParams(gen_length=32, steps=32, sigma=0.3), use_tqdm=False)
    # sigma 0.3: a mask next to a known token has density ~0.2, two away ~1e-10: every commit extends the
    # committed prefix (the right end stays unknown until reached)
    assert order == list(range(5, 37))


def test_bad_options():
    with pytest.raises(ValueError, match="sigma"):
        SamplingParams(sigma=0.0)
    with pytest.raises(ValueError, match="origin"):
        SamplingParams(sigma=1.0, remasking="origin")
    with pytest.raises(ValueError, match="rho"):
        make_policy("dllm", {"rho": 1.5})
    with pytest.raises(ValueError, match="kr"):
        make_policy("dllm", {"kr": 0})
    with pytest.raises(ValueError, match="current_k"):
        make_policy("d2cache", {"current_k": 0})
    with pytest.raises(ValueError, match="unknown|not_an_option"):
        make_policy("d2cache", {"not_an_option": 1})
    with pytest.raises(ValueError, match="frozen_confidence"):
        make_policy("d2cache", {"reference": True, "frozen_confidence": False})
