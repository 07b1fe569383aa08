"""Continuous batching: batch invariance, staggered arrivals, budgets, aborts, leaks and bad input."""

from __future__ import annotations

import random

import pytest

from checkpoints import write_checkpoint
from dengine import LLM, LLMEngine, SamplingParams
from dengine.kv import RequestTooLargeError
from dengine.scheduler.policies import POLICIES as REGISTERED

POLICIES = sorted(REGISTERED)


def _llm(folder, policy="none", **kwargs):
    kwargs.setdefault("kv_cache_memory", 1 << 24)
    return LLM(folder, dtype="float64", cache_policy=policy, block_size=8, **kwargs)


def _mixed_requests(rng, n):
    prompts, params = [], []
    for _ in range(n):
        prompts.append({"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(1, 20))]})
        block = rng.choice([8, 16])
        gen = block * rng.randint(1, 2)
        params.append(SamplingParams(gen_length=gen, block_length=block, steps=gen // rng.choice([1, 2]),
                                     threshold=rng.choice([None, 0.3])))
    return prompts, params


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", POLICIES)
def test_batch_gives_the_same_tokens_as_each_prompt_alone(folders, family, policy, seed):
    rng = random.Random(seed)
    prompts, params = _mixed_requests(rng, 6)
    llm = _llm(folders[family], policy)
    together = llm.generate(prompts, params, use_tqdm=False)
    alone = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.metrics.nfe for o in together] == [o.metrics.nfe for o in alone]
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.pool.num_blocks


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_staggered_arrivals_with_mixed_policies_and_small_limits(folders, family, seed):
    """Requests join and finish at different steps, under max_num_seqs and token-budget pressure."""
    rng = random.Random(seed)
    prompts, params = _mixed_requests(rng, 8)
    params = [
        p.replace(cache_policy=rng.choice(POLICIES))
        for p in params
    ]
    reference = _llm(folders[family])
    expected = [reference.generate(p, sp, use_tqdm=False)[0].token_ids for p, sp in zip(prompts, params)]

    engine = _llm(folders[family], max_num_seqs=3, max_num_batched_tokens=64).engine
    pending = list(range(len(prompts)))
    results, steps = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            i = pending.pop(0)
            engine.add_request(f"r{i}", prompts[i], params[i])
        for output in engine.step():
            results[int(output.request_id[1:])] = output.token_ids
        assert len(engine.scheduler.running) <= 3
        steps += 1
        assert steps < 10_000
    assert [results[i] for i in range(len(prompts))] == expected
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_token_budget_defers_instead_of_failing(folders):
    engine = _llm(folders["llada"], max_num_batched_tokens=40).engine
    for i in range(3):
        engine.add_request(i, {"prompt_token_ids": [1] * 8}, SamplingParams(gen_length=16, steps=16))
    out = engine.scheduler.schedule()
    assert len(out.sequences) == 1 and len(out.deferred) == 2  # each full step costs 24 of the 40 tokens
    assert out.num_batched_tokens == 24
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_deferred_sequences_go_first_next_step(folders):
    engine = _llm(folders["llada"], max_num_batched_tokens=30).engine
    for i in range(3):
        engine.add_request(i, {"prompt_token_ids": [1] * 8}, SamplingParams(gen_length=16, steps=16))
    order = []
    for _ in range(3):
        out = engine.scheduler.schedule()
        order.append(out.sequences[0].request_id)
        engine.step()
    assert sorted(order) == [0, 1, 2], "round robin: every sequence is stepped within three steps"


def test_abort_frees_blocks_everywhere(folders):
    engine = _llm(folders["dream"], max_num_seqs=2).engine
    for i in range(4):
        engine.add_request(i, {"prompt_token_ids": [3, 4, 5]}, SamplingParams(gen_length=32, steps=32))
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2
    running_output = engine.abort_request(0)
    waiting_output = engine.abort_request(3)
    assert running_output.finish_reason == "abort" and not running_output.finished
    assert running_output.metrics.nfe == 1 and waiting_output.metrics.nfe == 0
    assert engine.abort_request(0) is None and engine.abort_request("unknown") is None
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_an_error_mid_generate_frees_every_block(folders, monkeypatch):
    llm = _llm(folders["llada"])
    real_run, calls = llm.engine.runner.run, []

    def failing_run(queries):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_run(queries)

    monkeypatch.setattr(llm.engine.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([{"prompt_token_ids": [1, 2]}] * 3, SamplingParams(gen_length=16), use_tqdm=False)
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.pool.num_blocks
    assert not llm.engine.has_unfinished_requests()
    monkeypatch.setattr(llm.engine.runner, "run", real_run)
    assert len(llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(gen_length=8), use_tqdm=False)) == 1


def test_stop_at_eos_finishes_early_with_the_same_answer(folders, tmp_path):
    import json
    import shutil

    prompt = {"prompt_token_ids": [5, 6, 7]}
    params = dict(gen_length=32, block_length=8, steps=32)
    full = _llm(folders["llada"]).generate(prompt, SamplingParams(**params), use_tqdm=False)[0]
    # Declare as EOS a token the model produces early: its first occurrence then ends the answer.
    firsts = {token: full.token_ids.index(token) for token in full.token_ids}
    eos = min(firsts, key=lambda token: (not 8 <= firsts[token] < 24, firsts[token]))
    folder = tmp_path / "eos"
    shutil.copytree(folders["llada"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=eos, pad_token_id=eos)
    (folder / "config.json").write_text(json.dumps(config))
    llm = _llm(folder)
    again = llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]
    early = llm.generate(prompt, SamplingParams(**params, stop_at_eos=True), use_tqdm=False)[0]
    assert again.token_ids == full.token_ids and again.finish_reason == "length"
    assert early.token_ids == full.token_ids[: firsts[eos] + 1]
    assert early.finish_reason == "eos" and early.metrics.stopped_early
    assert early.metrics.nfe < full.metrics.nfe
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.pool.num_blocks


def test_outputs_in_order_with_metrics(folders):
    llm = _llm(folders["dream"], "dual")
    prompts = [{"prompt_token_ids": [i + 1] * (i + 2)} for i in range(5)]
    outs = llm.generate(prompts, SamplingParams(gen_length=16, block_length=8, steps=8), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]
    for o, p in zip(outs, prompts):
        m = o.metrics
        assert len(o.token_ids) == 16 and o.finished and o.text is None
        assert m.nfe == 8 and m.full_recomputes == 2 and m.committed_tokens == 16
        assert m.tokens_per_forward == 2.0 and m.cache_policy == "dual"
        canvas = len(p["prompt_token_ids"]) + 16
        assert m.query_tokens == 2 * canvas + 6 * 8  # two block-start refreshes, six block-window steps
        assert m.latency_s >= m.queue_s >= 0 and m.decision_seconds >= 0


@pytest.mark.parametrize("family,params", [
    ("llada", dict(steps=16)), ("llada", dict(threshold=0.5)), ("llada", dict(remasking="random")),
    ("dream", dict(alg="origin")), ("dream", dict(alg="entropy", top_p=0.9)), ("dream", dict(threshold=0.5)),
])
def test_committed_tokens_never_exceed_the_canvas_at_the_hottest_temperature(folders, family, params, seed):
    """The largest temperature accepted (flat distributions, ties everywhere) still commits each position once."""
    from dengine.sampling_params import MAX_TEMPERATURE

    llm = _llm(folders[family], "entropy")
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(
        gen_length=16, block_length=8, temperature=MAX_TEMPERATURE, seed=seed % 1000, **params), use_tqdm=False)[0]
    assert out.metrics.committed_tokens == 16 and len(out.token_ids) == 16
    assert llm.engine.config.mask_token_id not in out.token_ids


def test_per_request_policy_override_and_its_validation(folders):
    llm = _llm(folders["llada"], "none")
    params = SamplingParams(gen_length=16, block_length=8, steps=8, cache_policy="dual")
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0]
    assert out.metrics.cache_policy == "dual" and out.metrics.full_recomputes == 2
    with pytest.raises(ValueError, match="cache_config for policy 'dual'.*unknown field `tau`"):
        llm.generate({"prompt_token_ids": [1]}, SamplingParams(cache_policy="dual", cache_config={"tau": 1.0}))
    with pytest.raises(ValueError, match="cache_policy 'fancy' is unknown"):
        _llm(folders["llada"], "fancy")


BAD_PARAMS = [
    (dict(gen_length=0), "gen_length must be >= 1"),
    (dict(gen_length=30, block_length=8), "not a multiple of block_length"),
    (dict(gen_length=32, block_length=8, steps=6), "steps 6 is not divisible by the number of blocks 4"),
    (dict(threshold=0.0), "threshold must be > 0.0"),
    (dict(threshold=1.5), "threshold must be <= 1.0"),
    (dict(threshold=0.9, factor=1.0), "set at most one"),
    (dict(temperature=-0.1), "temperature must be >= 0.0"),
    (dict(remasking="greedy"), "remasking 'greedy' is unknown"),
    (dict(gen_length=8.5), "gen_length must be an integer"),
    (dict(remasking="origin", threshold=0.9), "cannot use threshold"),
    (dict(top_k=-2), "top_k must be >= -1"),
    (dict(alg="entropy", remasking="origin"), "are the same option; they disagree"),
    (dict(alg="nonsense"), "remasking 'nonsense' is unknown"),
    (dict(gen_length=32, steps=1_000_000_000), "steps 1000000000 exceeds gen_length 32"),
    (dict(temperature=1e30), "temperature must be <= 100.0"),
    (dict(cfg_scale=1e308), "cfg_scale must be <= 100.0"),
    (dict(seed=2**64), "seed must be <= 9223372036854775807"),
    (dict(top_k=1.5), "top_k must be an integer"),
]


def test_alg_is_dreams_name_for_remasking():
    params = SamplingParams(alg="topk_margin")
    assert params == SamplingParams(remasking="topk_margin") and params.alg is None
    assert params.replace(remasking="entropy").remasking == "entropy"  # a copy may change it again


@pytest.mark.parametrize("kwargs,message", BAD_PARAMS)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=message):  # a copy with changes is validated the same way
        SamplingParams(gen_length=32, block_length=8).replace(**{"block_length": None, **kwargs})


def test_bad_requests_name_the_prompt_and_lose_nothing(folders):
    llm = _llm(folders["llada"])
    engine = llm.engine
    good = {"prompt_token_ids": [1, 2, 3]}
    cases = [
        ([good, {"prompt_token_ids": []}], None, "prompt 1: the prompt is empty"),
        ([good, {"prompt_token_ids": [engine.config.mask_token_id] * 3}], None, "prompt 1: .* only mask tokens"),
        ([good, good, {"prompt_token_ids": [1, 10_000]}], None, "prompt 2: prompt token id 10000 is outside"),
        ([good, "some text"], None, "prompt 1: .* has no tokenizer"),
        ([good], SamplingParams(gen_length=600), "prompt 0: .* exceeds the model's maximum of 512"),
        ([good], SamplingParams(top_k=5), "prompt 0: top_k is a Dream-only option"),
        ([good], SamplingParams(remasking="entropy"), "prompt 0: remasking 'entropy' is a Dream algorithm"),
        ([good, good], [SamplingParams()], "1 sampling_params for 2 prompts"),
        ([good, 42], None, "prompt 1: a prompt is a string or a dict"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
        assert not engine.has_unfinished_requests()
        assert engine.kv_manager.num_free_blocks == engine.kv_manager.pool.num_blocks
    dream = _llm(folders["dream"])
    with pytest.raises(ValueError, match="cfg_scale is a LLaDA-only option"):
        dream.generate(good, SamplingParams(cfg_scale=1.0), use_tqdm=False)
    with pytest.raises(ValueError, match="remasking 'random' is LLaDA's"):
        dream.generate(good, SamplingParams(remasking="random"), use_tqdm=False)
    # "no top-k filter" (0 or -1, vLLM's convention) is what LLaDA does anyway: accepted, same output
    plain = llm.generate(good, SamplingParams(gen_length=8), use_tqdm=False)[0].token_ids
    for off in (0, -1):
        assert llm.generate(good, SamplingParams(gen_length=8, top_k=off), use_tqdm=False)[0].token_ids == plain


def test_request_larger_than_the_pool_or_budget(folders):
    small = _llm(folders["llada"], kv_cache_memory=4 * 2 * 2 * 8 * 64 * 8)  # 4 blocks of 8 tokens (fp64)
    assert small.engine.kv_manager.pool.num_blocks == 4
    with pytest.raises(RequestTooLargeError, match="prompt 0: a canvas of 40 tokens needs 5 KV blocks"):
        small.generate({"prompt_token_ids": [1] * 8}, SamplingParams(gen_length=32), use_tqdm=False)
    with pytest.raises(RequestTooLargeError, match="2 canvases of 24 tokens"):
        small.generate({"prompt_token_ids": [1] * 8}, SamplingParams(gen_length=16, cfg_scale=1.0), use_tqdm=False)
    tight = _llm(folders["llada"], max_num_batched_tokens=20)
    with pytest.raises(ValueError, match="costs 24 tokens but max_num_batched_tokens is 20"):
        tight.generate({"prompt_token_ids": [1] * 8}, SamplingParams(gen_length=16), use_tqdm=False)


def test_engine_options_are_validated(folders):
    for kwargs, message in (
        (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
        (dict(block_size=-4), "block_size must be a positive integer"),
        (dict(kv_cache_memory=2.0), "kv_cache_memory as a fraction"),
        (dict(attention_backend="flash-attn"), "cannot run on cpu"),
    ):
        with pytest.raises(ValueError, match=message):
            LLMEngine(folders["llada"], **kwargs)
    engine = _llm(folders["llada"]).engine
    engine.add_request("same", {"prompt_token_ids": [1]}, SamplingParams(gen_length=8))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("same", {"prompt_token_ids": [1]}, SamplingParams(gen_length=8))


def test_chat_and_text_prompts_through_a_real_tokenizer(tmp_path, seed):
    import json

    from checkpoints import write_llada_tokenizer

    folder, _ = write_checkpoint(tmp_path / "chat", "llada", seed=seed, head_scale=4.0, attn_scale=6.0)
    corpus = ["What is 2 + 3? It is 5.", "Hello there, how are you?", "Numbers: 0 1 2 3 4 5 6 7 8 9"] * 30
    ids = write_llada_tokenizer(folder, corpus, vocab_size=300)
    config = json.loads((folder / "config.json").read_text())
    config.update(mask_token_id=ids["<|mdm_mask|>"], eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(folder, dtype="float32", kv_cache_memory=1 << 24)
    tokenizer = llm.get_tokenizer()
    assert llm.engine.eot_token_id == ids["<|eot_id|>"]
    params = SamplingParams(gen_length=16, block_length=8, steps=8)
    chat = llm.chat([{"role": "user", "content": "What is 2 + 3?"}], params, use_tqdm=False)[0]
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.prompt_token_ids == tokenizer.encode(expected_prompt, add_special_tokens=False)
    assert chat.prompt_token_ids[0] == ids["<|startoftext|>"]
    stops = {ids["<|endoftext|>"], ids["<|eot_id|>"]}
    cut = next((i for i, t in enumerate(chat.token_ids) if t in stops), len(chat.token_ids))
    assert chat.text == tokenizer.decode(chat.token_ids[:cut], skip_special_tokens=True)
    text = llm.generate("Hello there", params, use_tqdm=False)[0]
    assert text.prompt == "Hello there" and text.prompt_token_ids == tokenizer.encode("Hello there", add_special_tokens=False)
    batch = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Numbers"}]], params, use_tqdm=False)
    assert len(batch) == 2
    with pytest.raises(ValueError, match="conversation 0"):
        llm.chat([[{"content": "no role"}]], params)
    no_tokenizer = LLM(folder, dtype="float32", kv_cache_memory=1 << 24, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="has no tokenizer"):
        no_tokenizer.generate("Hello", params, use_tqdm=False)
    assert no_tokenizer.generate({"prompt_token_ids": [1, 2]}, params, use_tqdm=False)[0].text is None


def test_freed_memory_is_kept_on_glibc():
    """The CPU engine's malloc settings apply where glibc is the C library (mallopt accepts them)."""
    import platform

    from dengine.engine import keep_freed_memory

    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
