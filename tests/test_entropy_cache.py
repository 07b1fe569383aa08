"""EntropyCache: the entropy trigger, its query sets, k-recent bookkeeping and per-sequence batched decisions."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
import torch

from dengine import LLM, SamplingParams
from dengine.decoding import StepOutcome
from dengine.scheduler.policies import make_policy
from dengine.scheduler.policies.entropy import max_entropy


def _llm(folder, policy="entropy", **kwargs):
    return LLM(folder, dtype="float64", cache_policy=policy, kv_cache_memory=1 << 24, block_size=8, **kwargs)


def _record_queries(llm, monkeypatch):
    """Every step's per-sequence query positions, as the runner receives them."""
    steps = []
    real_run = llm.engine.runner.run

    def run(queries):
        steps.append([(q.query_positions.tolist(), q.token_ids.numel()) for q in queries])
        return real_run(queries)

    monkeypatch.setattr(llm.engine.runner, "run", run)
    return steps


SAMPLERS = [
    dict(gen_length=24, block_length=8, steps=24),
    dict(gen_length=24, block_length=8, steps=12, threshold=0.3),
]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=["one-per-step", "threshold"])
def test_tau_zero_recomputes_every_step_and_equals_none(folders, family, sampler, seed):
    rng = random.Random(seed)
    prompt = {"prompt_token_ids": [rng.randrange(300) for _ in range(7)]}
    if family == "dream":
        sampler = {**sampler, "remasking": "maskgit_plus"}
    exact = _llm(folders[family], "none").generate(prompt, SamplingParams(**sampler), use_tqdm=False)[0]
    params = SamplingParams(**sampler, cache_config={"tau": 0.0, "k": 4})
    out = _llm(folders[family]).generate(prompt, params, use_tqdm=False)[0]
    assert out.token_ids == exact.token_ids
    assert out.metrics.full_recompute_rate == 1.0 and out.metrics.cache_policy == "entropy"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_large_tau_and_k_zero_computes_only_the_block_masks(folders, family, monkeypatch):
    from dengine.scheduler.sequence import Sequence

    planned = []
    original = Sequence.plan

    def recording_plan(self):
        queries = original(self)
        planned.append((self.masked_in_block().tolist(), queries[0].query_positions.tolist(), self.num_tokens))
        return queries

    monkeypatch.setattr(Sequence, "plan", recording_plan)
    llm = _llm(folders[family], cache_config={"tau": 1e9, "k": 0})
    out = llm.generate({"prompt_token_ids": [3, 1, 4, 1, 5]}, SamplingParams(gen_length=16, block_length=8, steps=16),
                       use_tqdm=False)[0]
    assert len(planned) == out.metrics.nfe
    # Full until the first commit (Dream's schedule may commit nothing at its first step), then the masks.
    initial = planned[0][0]
    leading = next(i for i, (masked, _, _) in enumerate(planned) if masked != initial)
    assert out.metrics.full_recomputes == leading
    for masked, query, length in planned[:leading]:
        assert query == list(range(length))
    for masked, query, _ in planned[leading:]:
        expected = set(masked) | ({p - 1 for p in masked} if family == "dream" else set())
        assert query == sorted(expected)
    assert out.metrics.avg_query_tokens < length


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_suffix_adds_every_position_after_the_block(folders, family, monkeypatch, seed):
    from dengine.scheduler.sequence import Sequence

    planned = []
    original = Sequence.plan

    def recording_plan(self):
        queries = original(self)
        planned.append((self.masked_in_block().tolist(), self.block_end, queries[0].query_positions.tolist(),
                        self.num_tokens))
        return queries

    monkeypatch.setattr(Sequence, "plan", recording_plan)
    rng = random.Random(seed)
    llm = _llm(folders[family], cache_config={"tau": 1e9, "k": 0, "recent_steps": 0, "suffix": True})
    prompt = {"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(2, 9))]}
    threshold = rng.choice([None, 0.3])
    out = llm.generate(prompt, SamplingParams(gen_length=24, block_length=8, steps=24 if threshold is None else 12,
                                              threshold=threshold), use_tqdm=False)[0]
    partial = [(masked, end, query, length) for masked, end, query, length in planned if len(query) < length]
    assert len(partial) == out.metrics.nfe - out.metrics.full_recomputes and partial
    assert any(end < length for _, end, _, length in partial), "some partial step has a suffix"
    for masked, end, query, length in partial:
        expected = set(masked) | ({p - 1 for p in masked} if family == "dream" else set()) | set(range(end, length))
        assert query == sorted(expected)


def test_k_recent_orders_by_commit_step_then_position():
    policy = make_policy("entropy", {"tau": 10.0, "k": 4})
    uniform = torch.full((1, 5), 0.2)

    def commit(*positions):
        probs = uniform.expand(len(positions), 5)
        policy.observe(None, StepOutcome(torch.tensor(positions), torch.zeros(len(positions)), probs), full=False)

    commit(5, 9)
    commit(7)
    assert policy.recent.tolist() == [7, 5, 9]
    commit(3, 4, 8)
    assert policy.recent.tolist() == [3, 4, 8, 7], "newest step first, by position within a step, exactly k"
    commit()  # a step without commits changes nothing
    assert policy.recent.tolist() == [3, 4, 8, 7]
    none_kept = make_policy("entropy", {"tau": 10.0, "k": 0})
    none_kept.observe(None, StepOutcome(torch.tensor([1]), torch.zeros(1), uniform), full=False)
    assert none_kept.recent.numel() == 0


def test_entropy_signal_and_decision_by_hand():
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    flat = torch.full((1, 4), 0.25)
    assert max_entropy(flat) == pytest.approx(math.log(4))
    assert max_entropy(torch.cat([peaked, flat])) == pytest.approx(math.log(4))
    assert max_entropy(torch.tensor([[1.0, 0.0, 0.0, 0.0]])) == 0.0
    policy = make_policy("entropy", {"tau": 0.5, "k": 2})
    assert policy.needs_full_recompute, "step 0 is full"
    policy.observe(None, StepOutcome(torch.tensor([3]), torch.zeros(1), peaked), full=True)
    assert not policy.needs_full_recompute  # H(peaked) = 0.17 <= 0.5
    policy.observe(None, StepOutcome(torch.tensor([4, 6]), torch.zeros(2), torch.cat([peaked, flat])), full=False)
    assert policy.needs_full_recompute  # H(flat) = 1.39 > 0.5
    policy.observe(None, StepOutcome(torch.zeros(0, dtype=torch.long), torch.zeros(0), flat[:0]), full=True)
    assert policy.needs_full_recompute, "no commits: the previous decision stands"


def test_the_decision_reads_only_the_committed_positions(folders, monkeypatch):
    """Uncommitted candidates get maximal-entropy logits; a policy reading them would recompute."""
    llm = _llm(folders["llada"], cache_config={"tau": 1.0, "k": 2})
    steps = _record_queries(llm, monkeypatch)
    from dengine.scheduler.sequence import Sequence

    original = Sequence.apply

    def poisoned_apply(self, queries, logits):
        rows = logits[0].clone()
        best = rows.max(-1).values.argmax()
        keep = rows[best].clone()
        keep[int(keep.argmax())] = 1e4  # the committed row: a point mass, entropy 0
        rows[:] = 0.0  # every other candidate: uniform over the vocabulary, entropy log(V) > tau
        rows[best] = keep
        return original(self, queries, [rows])

    monkeypatch.setattr(Sequence, "apply", poisoned_apply)
    out = llm.generate({"prompt_token_ids": [9, 8, 7]}, SamplingParams(gen_length=16, block_length=8, steps=16),
                       use_tqdm=False)[0]
    assert math.log(llm.engine.config.vocab_size) > 1.0
    assert out.metrics.full_recomputes == 1, "only step 0 is full: the uniform rows were never read"
    assert all(len(step[0][0]) < step[0][1] for step in steps[1:])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batched_sequences_decide_alone_and_match_their_solo_runs(folders, family, monkeypatch, seed):
    rng = random.Random(seed)
    taus = [0.0, 0.05, 0.5, 2.0, 1e9]
    prompts = [{"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(2, 12))]} for _ in taus]
    params = [
        SamplingParams(gen_length=16, block_length=8, steps=16, cache_config={"tau": tau, "k": rng.randint(0, 6)})
        for tau in taus
    ]
    llm = _llm(folders[family])
    steps = _record_queries(llm, monkeypatch)
    together = llm.generate(prompts, params, use_tqdm=False)
    mixed = [step for step in steps if len({len(q) == n for q, n in step}) == 2]
    assert mixed, "some step should hold full and partial sequences together"
    solo = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in solo]
    assert [o.metrics.full_recomputes for o in together] == [o.metrics.full_recomputes for o in solo]
    assert together[0].metrics.full_recompute_rate == 1.0
    # tau = 1e9: full only until the first commit (one step; two when Dream's first step commits nothing).
    assert together[-1].metrics.full_recomputes <= 2
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.pool.num_blocks


def test_refresh_on_block_start(folders):
    llm = _llm(folders["llada"], cache_config={"tau": 1e9, "k": 3, "refresh_on_block_start": True})
    out = llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(gen_length=24, block_length=8, steps=24),
                       use_tqdm=False)[0]
    assert out.metrics.full_recomputes == 3  # step 0 and the first step of blocks 1 and 2


def test_entropy_options_are_validated(folders):
    for config, message in (({"tau": -1.0}, "tau"), ({"k": -2}, "k"), ({"window": 3}, "unknown field")):
        with pytest.raises(ValueError, match=f"cache_config for policy 'entropy'.*{message}"):
            _llm(folders["llada"], cache_config=config)


def _commit(policy, positions, probs, full=False, seq=None):
    policy.observe(seq, StepOutcome(torch.tensor(positions, dtype=torch.long), torch.zeros(len(positions)), probs),
                   full=full)


def test_parallel_options_by_hand():
    """Entropy mass, the budget since the last refresh and recent_steps, on crafted distributions."""
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]])  # H = 0.1677
    h = float(torch.special.entr(peaked).sum())
    three = peaked.expand(3, 4)
    paper = make_policy("entropy", {"tau": 0.3, "k": 1})
    mass = make_policy("entropy", {"tau": 0.3, "k": 1, "signal": "sum"})
    budget = make_policy("entropy", {"tau": 0.4, "k": 1, "signal": "sum", "accumulate": True, "recent_steps": 1})
    for policy in (paper, mass, budget):
        _commit(policy, [5, 6, 7], three, full=True)
    assert paper.last_entropy == pytest.approx(h) and not paper.needs_full_recompute  # max 0.17 <= 0.3
    assert mass.last_entropy == pytest.approx(3 * h) and mass.needs_full_recompute  # mass 0.50 > 0.3
    assert budget.last_entropy == pytest.approx(3 * h) and budget.needs_full_recompute  # 0.50 > 0.4
    assert paper.recent.tolist() == [5] and budget.recent.tolist() == [5, 6, 7], "recent_steps covers the step"
    _commit(budget, [9], peaked, full=True)  # a refresh resets the budget
    assert budget.last_entropy == pytest.approx(h) and not budget.needs_full_recompute
    assert budget.recent.tolist() == [9]
    _commit(budget, [1, 2], peaked.expand(2, 4))  # partial: 0.17 + 0.34 = 0.50 > 0.4
    assert budget.last_entropy == pytest.approx(3 * h) and budget.needs_full_recompute
    assert budget.recent.tolist() == [1, 2]
    _commit(budget, [], peaked[:0])  # no commit: nothing changes
    assert budget.recent.tolist() == [1, 2] and budget.needs_full_recompute
    two_steps = make_policy("entropy", {"tau": 10.0, "k": 2, "recent_steps": 2})
    for positions in ([3, 4, 8], [1], [6, 7], [2]):
        _commit(two_steps, positions, peaked.expand(len(positions), 4))
    assert two_steps.recent.tolist() == [2, 6, 7], "every token of the newest 2 steps (3 > k)"
    _commit(two_steps, [11], peaked)
    assert two_steps.recent.tolist() == [11, 2], "k when the newest steps hold fewer"


def test_suffix_tau_recomputes_the_suffix_once_its_stale_mass_reaches_it_by_hand():
    """suffix_tau: a partial step computes the suffix only once the entropy mass committed since the suffix was
    last computed (by a full step or a partial step that included it) reaches suffix_tau; 0 is every step."""
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]])  # H = 0.1677
    h = float(torch.special.entr(peaked).sum())

    class Seq:
        params = SamplingParams(gen_length=16, block_length=4, threshold=0.9)
        block_end, num_tokens = 8, 12

        @staticmethod
        def masked_in_block():
            return torch.tensor([6, 7])

    policy = make_policy("entropy", {"tau": 1e9, "k": 0, "recent_steps": 0, "suffix": True, "suffix_tau": 0.4})
    always = make_policy("entropy", {"tau": 1e9, "k": 0, "recent_steps": 0, "suffix": True, "suffix_tau": 0.0})
    with_suffix, without = [6, 7, 8, 9, 10, 11], [6, 7]
    planned = []
    for step, (positions, full) in enumerate([([1, 2], True), ([3], False), ([4], False), ([5], False), ([0], False)]):
        for p in (policy, always):
            _commit(p, positions, peaked.expand(len(positions), 4), full=full, seq=Seq)
        planned.append((policy.suffix_stale, policy.plan(Seq).tolist()))
        assert always.plan(Seq).tolist() == with_suffix, "suffix_tau 0: every partial step"
    assert [stale for stale, _ in planned] == pytest.approx([2 * h, 3 * h, h, 2 * h, 3 * h])
    assert [plan for _, plan in planned] == [without, with_suffix, without, without, with_suffix], \
        "0.34 < 0.4 after the full step; 0.50 >= 0.4: due; the step that computed it resets the mass to its own"


def test_defaults_follow_the_sampler_and_the_answers_blocks():
    from dengine.scheduler.policies.entropy import (LONG_PARALLEL_DEFAULTS, ONE_TOKEN_DEFAULTS, PARALLEL_DEFAULTS,
                                                    EntropyOptions)

    class Seq:
        def __init__(self, parallel, block_length):
            self.params = SamplingParams(gen_length=8, block_length=block_length,
                                         threshold=0.9 if parallel else None)

    for parallel, block_length, defaults in ((False, 8, ONE_TOKEN_DEFAULTS), (False, 4, ONE_TOKEN_DEFAULTS),
                                             (True, 8, PARALLEL_DEFAULTS), (True, 4, LONG_PARALLEL_DEFAULTS)):
        policy = make_policy("entropy")
        _commit(policy, [3], torch.full((1, 4), 0.25), seq=Seq(parallel, block_length))
        assert msgspec.structs.asdict(policy.effective) == {**msgspec.structs.asdict(EntropyOptions()), **defaults}
    assert LONG_PARALLEL_DEFAULTS["suffix"] and not PARALLEL_DEFAULTS["suffix"], \
        "the suffix settings are for answers of several blocks"
    chosen = make_policy("entropy", {"signal": "max", "tau": 0.5})
    _commit(chosen, [3], torch.full((1, 4), 0.25), seq=Seq(True, 4))
    assert (chosen.effective.signal, chosen.effective.tau) == ("max", 0.5), "a set option is never overridden"
    assert ONE_TOKEN_DEFAULTS["signal"] == "max" and not ONE_TOKEN_DEFAULTS["accumulate"] \
        and ONE_TOKEN_DEFAULTS["recent_steps"] == 0 and not ONE_TOKEN_DEFAULTS["suffix"], \
        "one token per step keeps the paper's rule"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_parallel_options_at_their_extremes(folders, family, seed):
    """tau 0 is exact decoding whatever the signal; one token per step, signal sum equals the paper's max."""
    rng = random.Random(seed)
    prompt = {"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(3, 9))]}
    extra = {"remasking": "maskgit_plus"} if family == "dream" else {}
    threshold = SamplingParams(gen_length=24, block_length=8, steps=12, threshold=0.3, **extra)
    exact = _llm(folders[family], "none").generate(prompt, threshold, use_tqdm=False)[0]
    budget = {"signal": "sum", "accumulate": True, "recent_steps": 2, "suffix": rng.random() < 0.5}
    out = _llm(folders[family]).generate(prompt, threshold.replace(cache_config={"tau": 0.0, **budget}),
                                        use_tqdm=False)[0]
    assert out.token_ids == exact.token_ids and out.metrics.full_recompute_rate == 1.0
    one = SamplingParams(gen_length=24, block_length=8, steps=24, **extra)
    tau = rng.choice([0.05, 0.3, 1.0])
    paper = _llm(folders[family]).generate(prompt, one.replace(cache_config={"tau": tau, "k": 2}), use_tqdm=False)[0]
    summed = _llm(folders[family]).generate(
        prompt, one.replace(cache_config={"tau": tau, "k": 2, "signal": "sum", "recent_steps": 1}), use_tqdm=False)[0]
    assert summed.token_ids == paper.token_ids
    assert summed.metrics.full_recomputes == paper.metrics.full_recomputes
    assert summed.metrics.avg_query_tokens == paper.metrics.avg_query_tokens


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_parallel_options_decide_per_sequence_and_batch_invariantly_in_fp32(folders, family, seed):
    """Threshold decoding with the parallel options: a batch equals each sequence run alone (float32)."""
    rng = random.Random(seed)
    configs = [{"tau": 0.0, "k": 2}, {"tau": rng.choice([0.05, 0.5]), "k": 4, "signal": "sum", "accumulate": True,
                                       "recent_steps": 1},
               {"tau": 1e9, "k": 0, "recent_steps": 2}, {"tau": 0.2, "k": 1, "signal": "sum"},
               {"tau": rng.choice([0.3, 1e9]), "k": 8, "recent_steps": 1, "suffix": True}]
    prompts = [{"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(2, 12))]} for _ in configs]
    extra = {"remasking": "maskgit_plus"} if family == "dream" else {}
    params = [SamplingParams(gen_length=24, block_length=8, steps=12, threshold=0.3, cache_config=c, **extra)
              for c in configs]
    llm = LLM(folders[family], dtype="float32", cache_policy="entropy", kv_cache_memory=1 << 24, block_size=8)
    together = llm.generate(prompts, params, use_tqdm=False)
    solo = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in solo]
    assert [o.metrics.full_recomputes for o in together] == [o.metrics.full_recomputes for o in solo]
    assert [o.metrics.query_tokens for o in together] == [o.metrics.query_tokens for o in solo]
    assert together[0].metrics.full_recompute_rate == 1.0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_unset_options_take_each_requests_answer_shape_defaults_in_one_batch(folders, family, seed):
    """Threshold decoding, no options: a one-block request decodes as PARALLEL_DEFAULTS spelled out, a request
    of several blocks in the same batch as LONG_PARALLEL_DEFAULTS spelled out (tokens, full steps, rows)."""
    from dengine.scheduler.policies.entropy import LONG_PARALLEL_DEFAULTS, PARALLEL_DEFAULTS

    rng = random.Random(seed)
    extra = {"remasking": "maskgit_plus"} if family == "dream" else {}
    one_block = SamplingParams(gen_length=24, block_length=24, steps=12, threshold=0.3, **extra)
    blocks = SamplingParams(gen_length=24, block_length=8, steps=12, threshold=0.3, **extra)
    prompts = [{"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(3, 9))]} for _ in range(2)]
    llm = LLM(folders[family], dtype="float32", cache_policy="entropy", kv_cache_memory=1 << 24, block_size=8)
    unset = llm.generate(prompts, [one_block, blocks], use_tqdm=False)
    spelled = llm.generate(prompts, [one_block.replace(cache_config=dict(PARALLEL_DEFAULTS)),
                                     blocks.replace(cache_config=dict(LONG_PARALLEL_DEFAULTS))], use_tqdm=False)
    swapped = llm.generate(prompts, [one_block.replace(cache_config=dict(LONG_PARALLEL_DEFAULTS)),
                                     blocks.replace(cache_config=dict(PARALLEL_DEFAULTS))], use_tqdm=False)
    for got, want in zip(unset, spelled):
        assert got.token_ids == want.token_ids
        assert (got.metrics.full_recomputes, got.metrics.query_tokens) == \
            (want.metrics.full_recomputes, want.metrics.query_tokens)
    assert unset[1].metrics.full_recomputes == 1, "several blocks: no full refresh after step 0"
    assert [o.metrics.query_tokens for o in swapped] != [o.metrics.query_tokens for o in unset], \
        "the two shapes' defaults must differ in what they compute here"
