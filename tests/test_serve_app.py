"""The async engine and the OpenAI-compatible app, in process (no Ray): streaming, validation, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from dengine import LLM, LLMEngine, SamplingParams
from dengine.async_engine import AsyncLLMEngine
from dengine.engine import release_openmp_threads
from dengine.serve.server import OpenAIServer, create_app

DEFAULTS = SamplingParams(gen_length=32, block_length=8)


def _engine(folder, **kwargs):
    return LLMEngine(folder, dtype="float32", kv_cache_memory=1 << 22, block_size=8, **kwargs)


@pytest.fixture(scope="module")
def client(chat_folders):
    server = OpenAIServer(AsyncLLMEngine(_engine(chat_folders["llada"])), "tiny", DEFAULTS)
    with TestClient(create_app(server)) as c:
        yield c


def _events(response):
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_stream_yields_each_block_once_and_concatenates_to_the_final_text(chat_folders, family, seed):
    engine = AsyncLLMEngine(_engine(chat_folders[family]))
    params = SamplingParams(gen_length=32, block_length=8, temperature=0.8, seed=seed % 1000)

    async def run():
        return [chunk async for chunk in engine.generate("Add: a1 b2", params)]

    chunks = asyncio.run(run())
    final = chunks[-1].output
    assert chunks[-1].finished and all(c.output is None and not c.finished for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == final.text
    assert sum((c.token_ids for c in chunks), []) == final.token_ids
    assert all(len(c.token_ids) == 8 for c in chunks[:-1]), "one chunk per completed block"
    expected = LLM(chat_folders[family], dtype="float32").generate("Add: a1 b2", params, use_tqdm=False)[0]
    assert final.token_ids == expected.token_ids


def test_concurrent_requests_with_mixed_parameters_all_complete_correctly(chat_folders, seed):
    rng = random.Random(seed)
    engine = AsyncLLMEngine(_engine(chat_folders["llada"], max_num_seqs=8))
    prompts = [f"Add: a{rng.randint(1, 9)} b{rng.randint(1, 9)}" for _ in range(32)]
    params = [SamplingParams(gen_length=16 * rng.randint(1, 2), block_length=16, temperature=rng.choice([0.0, 1.0]),
                             threshold=rng.choice([None, 0.5]), seed=rng.randrange(1000),
                             sigma=rng.choice([None, 2.0]),
                             cache_policy=rng.choice(["none", "dual", "entropy", "dllm", "d2cache"])) for _ in prompts]

    async def one(prompt, p):
        await asyncio.sleep(rng.random() * 0.05)
        return await engine.generate_full(prompt, p)

    async def run():
        return await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params)))

    outputs = asyncio.run(run())
    reference = LLM(chat_folders["llada"], dtype="float32")
    expected = reference.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    manager = engine.engine.kv_manager
    assert manager.num_free_blocks == manager.pool.num_blocks and engine.num_unfinished == 0


def test_a_request_that_finishes_before_its_stream_is_first_awaited_still_streams(chat_folders):
    """The second of n answers is read only after the first's chunk: it may have finished by then."""
    engine = AsyncLLMEngine(_engine(chat_folders["llada"]))

    async def run():
        first = engine.add_request("Add: a1 b2", SamplingParams(gen_length=8, block_length=8))
        second = engine.add_request("Add: a3", SamplingParams(gen_length=8, block_length=8))
        streams = [engine.stream(first), engine.stream(second)]  # as the server's n-answer streams do
        whole = await engine.generate_full("Add: a4", SamplingParams(gen_length=8, block_length=8))
        assert engine.num_unfinished == 0, "both finished before either stream was awaited"
        return whole, [[chunk async for chunk in stream] for stream in streams]

    whole, chunks = asyncio.run(run())
    for answer in chunks:
        assert answer[-1].finished and answer[-1].output is not None
        assert "".join(c.text for c in answer) == answer[-1].output.text
    assert whole.finished


def test_leaving_n_streamed_answers_early_aborts_the_ones_not_read_yet(chat_folders):
    engine = AsyncLLMEngine(_engine(chat_folders["llada"]))
    server = OpenAIServer(engine, "tiny", DEFAULTS)

    async def run():
        ids = [engine.add_request(f"Add: a{i}", SamplingParams(gen_length=64, block_length=8)) for i in range(3)]
        chunks = server._choice_chunks(ids)
        index, _ = await anext(chunks)  # the client reads answer 0's first block, then leaves
        await chunks.aclose()
        assert index == 0
        await engine.generate_full("Add: a4", SamplingParams(gen_length=8))  # one more step frees them

    asyncio.run(run())
    manager = engine.engine.kv_manager
    assert engine.num_unfinished == 0 and manager.num_free_blocks == manager.pool.num_blocks


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(chat_folders):
    engine = AsyncLLMEngine(_engine(chat_folders["llada"]))

    async def run():
        stream = engine.generate("Add: a1 b2", SamplingParams(gen_length=64, block_length=8))
        async for _ in stream:
            break
        await stream.aclose()
        task = asyncio.create_task(engine.generate_full("Add: a3", SamplingParams(gen_length=64, block_length=8)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the loop frees aborted requests before its next step; give it one
        await engine.generate_full("Add: a4", SamplingParams(gen_length=8))

    asyncio.run(run())
    manager = engine.engine.kv_manager
    assert manager.num_free_blocks == manager.pool.num_blocks and engine.num_unfinished == 0


def test_completion_and_chat_streamed_equal_non_streamed(client):
    body = {"model": "tiny", "prompt": "Add: a5 b7", "max_tokens": 32, "temperature": 0.7, "seed": 11}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion" and whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert whole["usage"]["prompt_tokens"] > 0
    # one token per step; the server stops once the answer is fixed, so a whole canvas only without an EOS
    if whole["choices"][0]["finish_reason"] == "length":
        assert whole["dengine"]["nfe"] == 32
    else:
        assert whole["dengine"]["nfe"] <= 32
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Add: a5 b7"}], "max_tokens": 32,
            "temperature": 0.7, "seed": 11, "block_length": 8, "cache_policy": "entropy", "tau": 0.5, "k": 4}
    whole = client.post("/v1/chat/completions", json=chat).json()
    assert whole["choices"][0]["message"]["role"] == "assistant"
    assert whole["dengine"]["cache_policy"] == "entropy"
    events = _events(client.post("/v1/chat/completions",
                                 json={**chat, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == whole["usage"] and events[-1]["choices"] == []


@pytest.mark.parametrize("top_k", [None, -1, 3])
def test_dream_top_k_through_the_server_equals_offline(chat_folders, top_k):
    """Dream's official default filter (top_k 50 when unset) and the filter-off value, served as offline."""
    server = OpenAIServer(AsyncLLMEngine(_engine(chat_folders["dream"])), "tiny", DEFAULTS)
    body = {"model": "tiny", "prompt": "Add: a3 b4", "max_tokens": 16, "remasking": "entropy"}
    if top_k is not None:
        body["top_k"] = top_k
    with TestClient(create_app(server)) as c:
        response = c.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    params = DEFAULTS.replace(gen_length=16, remasking="entropy", top_k=top_k)  # the server's block_length 8 too
    expected = LLM(chat_folders["dream"], dtype="float32").generate("Add: a3 b4", params, use_tqdm=False)[0]
    assert response.json()["choices"][0]["text"] == expected.text


def test_llada_accepts_top_k_off(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 8, "top_k": -1})
    assert response.status_code == 200, response.text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 24, "block_length": 16}, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "gen_length": 16}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 129}, "n"),  # OpenAI's limit is 128
    ("/v1/completions", {"prompt": "x", "n": 2, "trace": True}, "trace"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # OpenAI's limit is 4
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "echo": True}, "logprobs"),  # the prompt's: undefined
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": True, "stop_at_eos": True}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "cache_policy": "nonsense"}, "cache_policy"),
    ("/v1/completions", {"prompt": "x", "cache_policy": "dual", "tau": 0.3}, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0.9}, "top_p"),  # Dream-only option on a LLaDA model
    ("/v1/completions", {"prompt": "x", "top_k": 5}, "top_k"),  # likewise; only "off" (0 / -1) is accepted
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, "max_tokens"),  # named as sent, not gen_length
    ("/v1/completions", {"prompt": "x", "gen_length": -5}, "gen_length"),
    ("/v1/completions", {"prompt": "x", "alg": "nonsense"}, "alg"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 16, "steps": 1000000000}, "steps"),  # bounded work
    ("/v1/completions", {"prompt": "x", "temperature": 1e30}, "temperature"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "sigma": 0}, "sigma"),
    ("/v1/completions", {"prompt": "x", "cache_policy": "dllm", "cache_config": {"rho": 2}}, "cache_config"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, "prompt"),  # larger than the model or the KV pool
    ("/v1/completions", {"model": "tiny"}, "prompt"),  # missing
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}], "max_tokens": 2000}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                          "image_url": {"url": "x"}}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
                              "max_completion_tokens": 16}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]},
     "modalities"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "verbosity": "low"}, "verbosity"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_requests_get_400_in_openai_shape_and_the_server_keeps_serving(client, path, body, param):
    response = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 8}).status_code == 200


def test_errors_name_the_field_the_client_sent(client):
    error = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -5}).json()["error"]
    assert error["message"].startswith("max_tokens must be >= 1") and "gen_length" not in error["message"]
    error = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 24, "block_length": 16}).json()["error"]
    assert error["param"] == "max_tokens" and error["message"].startswith("max_tokens 24 is not a multiple")


def test_models_health_metrics_and_unknown_model(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    missing = client.post("/v1/completions", json={"model": "other", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8})
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["engine"]["running"] == 0
    metrics = client.get("/metrics").text
    for name in ("dengine_requests_total", "dengine_queue_length", "dengine_running_sequences",
                 "dengine_kv_cache_usage", "dengine_full_recompute_rate", "dengine_tokens_per_second"):
        assert name in metrics
    assert 'endpoint="completions",model="tiny",replica="local",status="400"' in metrics


@pytest.mark.parametrize("method, path, status", [("get", "/v1/nowhere", 404), ("get", "/v1/completions", 405),
                                                  ("delete", "/v1/models", 405)])
def test_unknown_routes_and_methods_answer_in_openai_shape(client, method, path, status):
    response = getattr(client, method)(path)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"].startswith(f"{method.upper()} {path}") and error["type"] and "detail" not in response.json()


def _server(folder, **kwargs) -> OpenAIServer:
    return OpenAIServer(AsyncLLMEngine(_engine(folder)), "tiny", DEFAULTS, **kwargs)


def test_a_slow_tokenization_does_not_stall_a_concurrent_request(chat_folders, monkeypatch):
    """Tokenization runs in a worker thread: while one chat prompt takes a second to tokenize, the engine
    keeps stepping another request (on the event loop it could not step at all meanwhile)."""
    server = _server(chat_folders["llada"])
    tokenizer = server.engine.engine.tokenizer
    encode, steps = tokenizer.encode, []

    def slow_encode(text, *args, **kwargs):
        if "slow" in text:
            steps.append(server.engine.stats().steps)
            time.sleep(1.0)
            steps.append(server.engine.stats().steps)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    long = json.dumps({"prompt": "Add: a1 b2", "max_tokens": 384, "block_length": 8}).encode()
    slow = json.dumps({"messages": [{"role": "user", "content": "slow"}], "max_tokens": 8}).encode()

    async def run():
        background = asyncio.create_task(server.respond("completions", long))
        while server.engine.stats().steps == 0:
            await asyncio.sleep(0.01)
        response = await server.respond("chat_completions", slow)
        return response, await background

    slow_response, long_response = asyncio.run(run())
    assert slow_response.status_code == 200 and long_response.status_code == 200 and len(steps) == 2
    assert steps[1] - steps[0] >= 3, f"{steps[1] - steps[0]} engine steps while a prompt was tokenized for 1 s"


def test_oversized_bodies_and_prompts_are_refused_before_tokenization(chat_folders, monkeypatch):
    server = _server(chat_folders["llada"], max_body_bytes=1 << 16)
    monkeypatch.setattr(server.engine.engine.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized"))
    with TestClient(create_app(server)) as c:
        response = c.post("/v1/completions", content=b'{"prompt": "' + b"x" * (1 << 17) + b'"}',
                          headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        too_long = "x" * (server.max_prompt_chars + 1)
        assert len(too_long) < 1 << 16
        for path, body, param in (("/v1/completions", {"prompt": too_long}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]},
                                   "messages")):
            response = c.post(path, json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        many_empty = [{"role": "user", "content": ""}] * (server.engine.engine.config.max_position_embeddings + 1)
        response = c.post("/v1/chat/completions", json={"messages": many_empty})
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text


def test_gauges_follow_the_engine_without_a_scrape_aborts_included(chat_folders):
    """The engine pushes its stats (as it does to Ray's export): running while decoding, 0 once aborted."""
    server = _server(chat_folders["llada"])
    # the whole canvas (no early stop at an EOS), so the request is still decoding when the gauge is read
    body = json.dumps({"prompt": "Add: a1 b2", "max_tokens": 384, "block_length": 8, "stream": True,
                       "stop_at_eos": False}).encode()

    def running() -> float:
        return server.metrics.registry.get_sample_value("dengine_running_sequences",
                                                        {"model": "tiny", "replica": "local"})

    async def run():
        events = (await server.respond("completions", body)).body_iterator
        await anext(events)
        await asyncio.sleep(0.8)  # stats are pushed at least every 0.5 s while stepping
        during = running()
        await events.aclose()
        for _ in range(100):
            if running() == 0:
                break
            await asyncio.sleep(0.02)
        return during, running()

    during, after = asyncio.run(run())
    assert during == 1 and after == 0
    assert server.metrics.registry.get_sample_value("dengine_kv_cache_usage",
                                                    {"model": "tiny", "replica": "local"}) == 0


def test_every_step_runs_on_the_engines_one_step_thread(chat_folders, seed):
    # Each thread that runs torch ops keeps its own OpenMP team; the async engine steps on one thread only.
    engine = AsyncLLMEngine(_engine(chat_folders["llada"]))
    threads = []
    step = engine.engine.step
    engine.engine.step = lambda: threads.append(threading.get_ident()) or step()
    params = SamplingParams(gen_length=16, block_length=8, seed=seed % 1000)

    async def run():
        return await asyncio.gather(*(engine.generate_full(f"Add: a{i} b2", params) for i in range(3)))

    for _ in range(2):  # a fresh event loop each time, as a second asyncio.run would have
        assert len(asyncio.run(run())) == 3
    assert len(threads) >= 4 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="counts threads in /proc; OpenMP builds of torch only")
def test_release_openmp_threads_ends_this_threads_team():
    if not any("libgomp" in line for line in open("/proc/self/maps")):
        pytest.skip("torch does not run on GNU OpenMP here")
    counts = {}

    def work():
        torch.ones(1 << 22).add_(1)  # a parallel region: this thread's team of torch.get_num_threads()
        counts["with team"] = _os_threads()
        counts["released"] = release_openmp_threads()
        counts["after"] = _os_threads()
        torch.ones(1 << 22).add_(1)  # a later parallel op starts a fresh team
        counts["again"] = _os_threads()

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(previous)
    assert counts["released"] is True
    assert counts["after"] == counts["with team"] - 1 and counts["again"] == counts["with team"]


def test_max_tokens_is_a_cap_the_server_stops_when_the_answer_is_fixed():
    """max_tokens 960 costs the steps of the blocks the answer reaches, not 960; at one canvas length the text
    equals a whole-canvas decode (stop_at_eos false), which takes a step for every position."""
    from dengine.assets import resolve_model

    engine = LLMEngine(resolve_model("llada-sudoku"), dtype="float32", kv_cache_memory=1 << 26, block_size=8)
    server = OpenAIServer(AsyncLLMEngine(engine), "llada-sudoku", SamplingParams(gen_length=24))
    messages = [{"role": "user", "content": "Complete the sudoku 1.../..1./.3../...4"}]

    def ask(client, **fields):
        body = client.post("/v1/chat/completions", json={"messages": messages, "block_length": 24, **fields}).json()
        return body["choices"][0], body["usage"]["completion_tokens"], body["dengine"]["nfe"]

    with TestClient(create_app(server)) as client:
        (long, long_tokens, long_nfe) = ask(client, max_tokens=960)
        (capped, _, capped_nfe) = ask(client, max_tokens=96)
        (whole, _, whole_nfe) = ask(client, max_tokens=96, stop_at_eos=False)
    assert long["finish_reason"] == "stop" and long_nfe <= 24 * (long_tokens // 24 + 1) < 960
    assert capped["message"]["content"] == whole["message"]["content"]
    assert whole_nfe == 96 and capped_nfe < 96


def test_an_embedded_model_asked_off_its_task_says_the_answer_means_nothing():
    from dengine.assets import resolve_model

    engine = LLMEngine(resolve_model("llada-sudoku"), dtype="float32", kv_cache_memory=1 << 26, block_size=8)
    server = OpenAIServer(AsyncLLMEngine(engine), "llada-sudoku", SamplingParams(gen_length=24))

    def chat(content, **fields):
        return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                          **fields})

    with TestClient(create_app(server)) as client:
        on_task = chat("Complete the sudoku 1.../..1./.3../...4").json()
        off_task = chat("What is the capital of France?").json()
        streamed = _events(chat("Complete the sudoku 123456789/.........", stream=True))
        question = "Complete the sudoku 1.../..1./.3../...4"
        bare = client.post("/v1/completions", json={"prompt": question}).json()
        templated = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                         add_generation_prompt=True, tokenize=False)
        raw = client.post("/v1/completions", json={"prompt": templated}).json()
    assert on_task["warning"] is None and off_task["choices"][0]["finish_reason"] in ("stop", "length")
    assert "trained only on the task sudoku4" in off_task["warning"] and "Complete the sudoku" in off_task["warning"]
    assert [e["warning"] is not None for e in streamed] == [False] * (len(streamed) - 1) + [True]
    assert raw["warning"] is None, "a task question inside the chat template is on task"
    assert "inside the model's chat template" in bare["warning"], "without the template the model is off its task"


def test_json_nested_past_the_decoders_depth_is_a_400_at_the_replica_and_the_router(client):
    from dengine.serve.proxy import with_seed

    nested = b'{"prompt": "x", "max_tokens": 8, "cache_config": {"k": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert with_seed(nested, random.Random(0)) == (nested, False), "the router passes it on unchanged"
    response = client.post("/v1/completions", content=nested, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]


def test_openai_fields_real_clients_send_are_honoured(client):
    """max_completion_tokens (the SDK's chat name), text content parts, the developer role, stop strings (streams
    too), echo, ignore_eos, user and penalties at their defaults: the bodies the openai SDK, guidellm and lm-eval
    send."""
    base = {"model": "tiny", "temperature": 0.7, "seed": 5, "block_length": 8}
    chat = lambda **f: client.post("/v1/chat/completions", json={**base, **f})  # noqa: E731
    plain = chat(messages=[{"role": "user", "content": "Add: a5 b7"}], max_tokens=32, modalities=["text"],
                 prompt_cache_key="k", safety_identifier="s", stream_options=None).json()
    parts = chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                           {"role": "user", "content": [{"type": "text", "text": "Add: "}, {"type": "text", "text": "a5 b7"}]}],
                 max_completion_tokens=32, user="u-1", presence_penalty=0, frequency_penalty=0.0).json()
    system = chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add: a5 b7"}],
                  max_tokens=32).json()
    assert parts["choices"][0]["message"]["content"] == system["choices"][0]["message"]["content"]
    assert parts["usage"] == system["usage"]

    body = {**base, "prompt": "Add: a5 b7", "max_tokens": 32, "stop_at_eos": False}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(whole) >= 6, whole
    stop = whole[3:5]
    cut = whole[: whole.find(stop)]
    stopped = client.post("/v1/completions", json={**body, "stop": [stop, "\x00never"]}).json()
    assert stopped["choices"][0] == {"index": 0, "text": cut, "finish_reason": "stop", "logprobs": None}
    events = _events(client.post("/v1/completions", json={**body, "stop": stop, "stream": True,
                                                           "stream_options": {"include_usage": True}}))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"] == stopped["usage"]

    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "Add: a5 b7" + whole
    streamed = _events(client.post("/v1/completions", json={**body, "echo": True, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in streamed) == echoed

    fixed = client.post("/v1/completions", json={**body, "stop_at_eos": None, "ignore_eos": True}).json()
    assert fixed["usage"]["completion_tokens"] == 32 and fixed["choices"][0]["finish_reason"] == "length"
    assert fixed["dengine"]["nfe"] == 32, "the whole canvas is decoded"


def test_stats_are_republished_while_the_engine_is_idle(chat_folders, monkeypatch):
    """Ray's metrics export drops a gauge not set within twice its report interval: an idle replica's gauges
    must be set again on a timer, not only when something happens."""
    import dengine.async_engine as async_engine

    monkeypatch.setattr(async_engine, "IDLE_STATS_S", 0.05)
    engine = AsyncLLMEngine(_engine(chat_folders["llada"]))
    published = []
    engine.on_stats = lambda stats: published.append(time.monotonic())

    async def run():
        chunks = [c async for c in engine.generate("Add: a1 b2", SamplingParams(gen_length=8))]
        assert chunks[-1].finished
        idle_since = time.monotonic()
        await asyncio.sleep(0.6)
        return idle_since

    idle_since = asyncio.run(run())
    assert sum(t > idle_since for t in published) >= 5, published


@pytest.mark.parametrize("client_does", ["stalls", "disconnects"])
def test_a_client_that_stops_sending_its_body_frees_its_slot(client_does, caplog):
    """A slow client (headers and part of a body, then nothing) gets a 408 after the body timeout instead of
    holding a request slot forever; one that disconnects mid-body is dropped quietly."""
    from dengine.serve.server import openai_app

    posted = []

    async def post(endpoint, body, headers):
        posted.append(body)
        return Response(b"{}", media_type="application/json")

    async def get(what):
        return Response(b"{}")

    app = openai_app(post, get, 1 << 20, body_timeout_s=0.2)
    sent = []
    messages = [{"type": "http.request", "body": b'{"prompt": "x', "more_body": True}]

    async def receive():
        if messages:
            return messages.pop(0)
        if client_does == "disconnects":
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"200")],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("test", 80),
             "client": ("test", 1), "root_path": "", "asgi": {"version": "3.0"}}
    start = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert not posted and time.monotonic() - start < 3
    assert status == (408 if client_does == "stalls" else 499)
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logprobs_are_each_tokens_probability_at_its_commit(chat_folders, family, seed):
    """RequestOutput.logprobs against the trace's record of every commit, under sampling and parallel decoding."""
    params = SamplingParams(gen_length=32, block_length=8, temperature=0.9, threshold=0.6, seed=seed % 1000,
                            logprobs=3, trace=True)
    out = LLM(chat_folders[family], dtype="float32").generate("Add: a2 b9", params, use_tqdm=False)[0]
    commits = {c.position - len(out.prompt_token_ids): c for step in out.trace.steps for c in step.commits}
    assert len(out.logprobs) == len(out.token_ids)
    for i, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        commit = commits[i]
        assert entry.token_id == token == commit.token_id
        assert entry.logprob == pytest.approx(math.log(commit.confidence), abs=1e-9)
        assert [t for t, _ in entry.top] == [a.token_id for a in commit.alternatives[:3]]
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)


def test_n_answers_are_n_requests_with_consecutive_seeds_batched(client, seed):
    """n > 1: choice i is what one request with seed + i returns, streamed or not; usage counts the prompt once;
    a stream's events come in rounds (every answer's k-th event by index), so a replay repeats them."""
    base = {"model": "tiny", "temperature": 1.0, "max_tokens": 32, "block_length": 8, "stop_at_eos": False}
    s = seed % 10_000
    for path, field, prompt in (("/v1/completions", "prompt", "Add: a3 b4"),
                                ("/v1/chat/completions", "messages", [{"role": "user", "content": "Add: a3 b4"}])):
        text = (lambda c: c["text"]) if field == "prompt" else (lambda c: c["message"]["content"])
        singles = [client.post(path, json={**base, field: prompt, "seed": s + i}).json() for i in range(3)]
        several = client.post(path, json={**base, field: prompt, "seed": s, "n": 3}).json()
        assert [c["index"] for c in several["choices"]] == [0, 1, 2]
        assert [text(c) for c in several["choices"]] == [text(r["choices"][0]) for r in singles]
        assert len({text(c) for c in several["choices"]}) > 1, "temperature 1: the answers differ"
        prompt_tokens = singles[0]["usage"]["prompt_tokens"]
        completion = sum(r["usage"]["completion_tokens"] for r in singles)
        assert several["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                    "total_tokens": prompt_tokens + completion}
        assert [m["nfe"] for m in several["dengine"]] == [r["dengine"]["nfe"] for r in singles]

        events = _events(client.post(path, json={**base, field: prompt, "seed": s, "n": 3, "stream": True,
                                                 "stream_options": {"include_usage": True}}))
        assert events[-1]["usage"] == several["usage"] and events[-1]["choices"] == []
        for index in range(3):
            joined = "".join((e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or "")
                             for e in events[:-1] if e["choices"][0]["index"] == index)
            assert joined == text(several["choices"][index])


def test_a_streams_event_order_with_n_answers_depends_only_on_the_answers(chat_folders, seed):
    """The router resumes a broken stream by replaying it elsewhere and checking the events sent: with n > 1 the
    replica interleaves the answers' events in rounds, so a replica that can run only two of the three answers at
    once (the third waits) sends exactly the events of one that runs all three together."""
    body = {"prompt": "Add: a7 b2", "n": 3, "seed": seed % 10_000, "temperature": 1.0, "max_tokens": 32,
            "block_length": 8, "threshold": 0.5, "stop_at_eos": False, "stream": True}
    streams = []
    for max_num_seqs in (2, 8):
        server = OpenAIServer(AsyncLLMEngine(_engine(chat_folders["llada"], max_num_seqs=max_num_seqs)), "tiny",
                              DEFAULTS)
        with TestClient(create_app(server)) as c:
            events = _events(c.post("/v1/completions", json=body))
        streams.append([{k: v for k, v in e.items() if k not in ("id", "created", "dengine")} for e in events])
    assert streams[0] == streams[1]
    assert len({e["choices"][0]["index"] for e in streams[0]}) == 3


def test_logprobs_through_both_endpoints_streamed_or_not(client):
    """logprobs / top_logprobs: one entry per answer token (its text, logprob and alternatives), the same whether
    streamed or not, ending where a stop string cut the text."""
    base = {"model": "tiny", "max_tokens": 32, "block_length": 8, "stop_at_eos": False}
    prompt = "Add: a6 b8"
    response = client.post("/v1/completions", json={**base, "prompt": prompt, "logprobs": 2}).json()
    whole = response["choices"][0]
    lp = whole["logprobs"]
    assert "".join(lp["tokens"]) == whole["text"] and len(lp["tokens"]) == response["usage"]["completion_tokens"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and 1 <= len(top) <= 2
        assert top[token] == logprob and max(top.values()) == logprob  # greedy: the committed token is the top one
    streamed = _events(client.post("/v1/completions", json={**base, "prompt": prompt, "logprobs": 2, "stream": True}))
    parts = [e["choices"][0]["logprobs"] for e in streamed if e["choices"][0]["logprobs"]]
    assert sum((part["tokens"] for part in parts), []) == lp["tokens"]
    assert sum((part["text_offset"] for part in parts), []) == lp["text_offset"]
    assert [e["choices"][0]["logprobs"] for e in streamed if not e["choices"][0]["text"]] in ([], [None])

    for seed in range(100):  # near-random weights: the first seed whose answer has two different characters
        sampled = {**base, "prompt": prompt, "temperature": 1.0, "seed": seed}
        text = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
        if len(set(text)) > 1:
            break
    first_change = next(i for i, ch in enumerate(text) if ch != text[0])
    stop, cut = text[first_change], text[:first_change]
    stopped = client.post("/v1/completions", json={**sampled, "logprobs": 0, "stop": stop}).json()
    tokens = stopped["choices"][0]["logprobs"]["tokens"]
    assert "".join(tokens).startswith(cut) and len("".join(tokens[:-1])) < len(cut)
    assert stopped["choices"][0]["logprobs"]["top_logprobs"] == [{t: v} for t, v in
                                                                 zip(tokens, stopped["choices"][0]["logprobs"]["token_logprobs"])]

    messages = [{"role": "user", "content": prompt}]
    chat = client.post("/v1/chat/completions", json={**base, "messages": messages, "logprobs": True,
                                                     "top_logprobs": 3}).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == chat["message"]["content"]
    assert all(bytes(c["bytes"]).decode() == c["token"] and len(c["top_logprobs"]) == 3
               and c["top_logprobs"][0]["logprob"] == c["logprob"] for c in content)
    chunks = _events(client.post("/v1/chat/completions", json={**base, "messages": messages, "logprobs": True,
                                                               "top_logprobs": 3, "stream": True}))
    assert sum((e["choices"][0]["logprobs"]["content"] for e in chunks if e["choices"][0]["logprobs"]), []) == content
    plain = client.post("/v1/chat/completions", json={**base, "messages": messages, "logprobs": True}).json()
    assert [c["top_logprobs"] for c in plain["choices"][0]["logprobs"]["content"]] == [[]] * len(content)
    assert client.post("/v1/chat/completions", json={**base, "messages": messages}).json()["choices"][0]["logprobs"] is None


def test_a_host_short_of_memory_refuses_new_requests_with_503_and_retry_after(chat_folders, monkeypatch):
    """Below the memory floor a replica takes no new work (503 overloaded, Retry-After) instead of growing into
    the OOM killer; a request in flight finishes, and requests are taken again once memory is back."""
    import dengine.serve.server as server_module

    server = _server(chat_folders["llada"])
    total = 24 << 30
    free = {"bytes": total // 2}
    monkeypatch.setattr(server_module, "host_memory", lambda: (free["bytes"], total))
    body = {"prompt": "Add: a1 b2", "max_tokens": 64, "block_length": 8, "stream": True}
    with TestClient(create_app(server)) as c:
        with c.stream("POST", "/v1/completions", json=body) as in_flight:
            free["bytes"] = int(0.04 * total)  # another process takes the memory meanwhile
            refused = c.post("/v1/completions", json={**body, "stream": False})
            events = [line for line in in_flight.iter_lines() if line]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "overloaded" and "short of memory" in refused.json()["error"]["message"]
        assert events[-1] == "data: [DONE]" and '"finish_reason":"' in events[-2], "the request in flight finished"
        assert server.engine.stats().waiting == 0 and server.engine.stats().running == 0
        free["bytes"] = total // 2
        assert c.post("/v1/completions", json={**body, "stream": False}).status_code == 200


def test_sampler_options_of_the_official_frameworks_reach_the_engine(client):
    """tokens_per_step (exactly N commits a step) and LLaDA's float32 softmax, as extra body fields."""
    base = {"model": "tiny", "prompt": "Add: a2 b3", "max_tokens": 16, "block_length": 8, "stop_at_eos": False}
    one = client.post("/v1/completions", json={**base, "tokens_per_step": 2}).json()
    assert one["dengine"]["nfe"] == 8 and one["dengine"]["tokens_per_forward"] == 2
    assert client.post("/v1/completions", json={**base, "softmax_dtype": "float32"}).status_code == 200
    refused = client.post("/v1/completions", json={**base, "tokens_per_step": 2, "threshold": 0.9})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens_per_step"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_min_tokens_keeps_the_answer_from_ending_early(chat_folders, family, seed):
    """The near-random test models end most answers at once; with min_tokens no EOS / end of turn is committed
    before that many generated positions, whatever order the canvas commits in, and usage counts them."""
    server = OpenAIServer(AsyncLLMEngine(_engine(chat_folders[family])), "tiny", DEFAULTS)
    body = {"prompt": "Add: a4 b4", "max_tokens": 32, "block_length": 8, "temperature": 1.0, "threshold": 0.5,
            "stop_at_eos": False}
    stops = server.stop_ids
    with TestClient(create_app(server)) as c:
        for s in range(seed % 1000, seed % 1000 + 6):
            minimum = random.Random(s).randint(1, 32)
            response = c.post("/v1/completions", json={**body, "seed": s, "min_tokens": minimum, "trace": True}).json()
            tokens = response["trace"]["token_ids"]
            first_stop = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
            assert first_stop >= minimum, (minimum, tokens)
            assert response["usage"]["completion_tokens"] >= minimum


@pytest.mark.parametrize("stream", [True, False])
def test_an_engine_replica_aborts_the_requests_of_a_router_that_died(chat_folders, stream):
    """EngineReplica.call (no Serve) reading for two routers: when one dies, its request ends and its engine work is
    aborted within the watch period; the other router's request decodes to the end, untouched."""
    deployment = pytest.importorskip("dengine.serve.deployment")
    cls = deployment.EngineReplica.func_or_class
    engine = AsyncLLMEngine(_engine(chat_folders["llada"], max_num_seqs=4))
    dead: set[str] = set()
    replica = cls.__new__(cls)
    replica.engine = engine
    replica.server = OpenAIServer(engine, "tiny", DEFAULTS)
    replica.routers = deployment.RouterWatch(lambda router: router not in dead, period_s=0.05)
    body = json.dumps({"prompt": "Add: a3 b4", "max_tokens": 480, "block_length": 8, "stream": stream,
                       "stop_at_eos": False, "seed": 1}).encode()

    async def read(router: str) -> list:
        return [part async for part in replica.call("completions", body, "cmpl-x", 1, router)]

    async def scenario():
        survivor = asyncio.ensure_future(read("alive"))
        orphan = asyncio.ensure_future(read("doomed"))
        while engine.stats().steps < 3:
            await asyncio.sleep(0.01)
        dead.add("doomed")
        orphan_parts = await asyncio.wait_for(orphan, 5)
        while engine.stats().running > 1:  # the engine loop applies the abort at its next step
            await asyncio.sleep(0.01)
        aborted_at = engine.stats().steps
        return orphan_parts, await survivor, aborted_at, engine.stats()

    orphan_parts, survivor_parts, aborted_at, final = asyncio.run(scenario())
    assert aborted_at < 100  # the orphan's engine work stopped long before its 480 steps
    if stream:
        assert not any(part == b"data: [DONE]\n\n" for part in orphan_parts)
        assert survivor_parts[-1] == b"data: [DONE]\n\n"
    else:
        assert orphan_parts == []  # it never got to answer
        # decoded to its end untouched: the same answer as the request alone (how many of its 480 positions
        # count as completion depends on where the near-random test model puts its end of text)
        alone = asyncio.run(read("alive"))
        assert json.loads(survivor_parts[-1])["choices"] == json.loads(alone[-1])["choices"]
        assert json.loads(survivor_parts[-1])["usage"] == json.loads(alone[-1])["usage"]
    assert final.running == 0 and final.kv_blocks_used == 0
    assert replica.routers.readers == {} and replica.routers.died == {}
