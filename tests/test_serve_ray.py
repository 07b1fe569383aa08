"""The Ray Serve deployment over real HTTP on a local Ray instance, and offline data parallelism.

One Ray instance and one two-replica application serve the whole module (starting Ray costs seconds)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
from ray import serve  # noqa: E402

from dengine import LLM, SamplingParams  # noqa: E402
from dengine.serve.deployment import build_app, ray_serving_environment  # noqa: E402

ENGINE = {"dtype": "float32", "kv_cache_memory": 1 << 22, "block_size": 8, "cache_policy": "entropy"}
DEFAULTS = {"gen_length": 32, "block_length": 8}
ROUTERS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replicas() -> list[str]:
    """The engine replicas' actor names (the router's aside)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::dengine#engine#")]


def _running_replicas() -> dict:
    app = serve.status().applications.get("dengine")
    if app is None or not {"dengine", "engine", "control"} <= set(app.deployments):
        return {}
    for name, running in (("dengine", ROUTERS), ("control", 1)):
        if app.deployments[name].replica_states != {"RUNNING": running}:
            return {name: dict(app.deployments[name].replica_states)}
    return dict(app.deployments["engine"].replica_states)


def _wait_healthy(url: str, replicas: int, timeout: float = 240.0) -> None:
    deadline, states = time.time() + timeout, {}
    while time.time() < deadline:
        states = _running_replicas()
        if states == {"RUNNING": replicas}:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"the application did not become healthy: replica states {states}, actors {_replicas()}")


@pytest.fixture(scope="module")
def cluster():
    ray_serving_environment()  # as `dengine serve` starts Ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def url(cluster, chat_folders):
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(str(chat_folders["llada"]), replicas=2, routers=ROUTERS, num_cpus=0.5, model_name="tiny",
                    defaults=DEFAULTS, **ENGINE)
    serve.run(app, name="dengine", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base, 2)
    yield base
    serve.shutdown()  # idempotent: the data-parallel test may have shut Serve down already


def _sse(response) -> list[dict]:
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_completions_and_chat_over_http_streamed_and_not(url):
    body = {"model": "tiny", "prompt": "Add: a3 b4", "max_tokens": 32, "temperature": 0.9, "seed": 5}
    whole = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()
    streamed = _sse(requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60))
    assert "".join(e["choices"][0]["text"] for e in streamed) == whole["choices"][0]["text"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Add: a3 b4"}], "max_tokens": 32, "seed": 5,
            "temperature": 0.9}
    whole = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
    events = _sse(requests.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, stream=True, timeout=60))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == whole["choices"][0]["message"]["content"]
    assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
    metrics = requests.get(f"{url}/metrics", timeout=10)
    replica = metrics.headers["X-Dengine-Replica"]
    assert f'replica="{replica}"' in metrics.text and "dengine_requests_total" in metrics.text
    health = requests.get(f"{url}/health", timeout=10).json()
    assert f"SERVE_REPLICA::dengine#engine#{health['replica']}" in _replicas()


def test_32_concurrent_mixed_requests_all_complete_with_correct_outputs(url, chat_folders, seed):
    rng = random.Random(seed)
    bodies = []
    for i in range(32):
        bodies.append({"prompt": f"Add: a{rng.randint(1, 9)} b{rng.randint(1, 9)}", "seed": rng.randrange(1000),
                       "max_tokens": rng.choice([16, 32]), "block_length": 8, "temperature": rng.choice([0.0, 1.0]),
                       "threshold": rng.choice([None, 0.5]), "cache_policy": rng.choice(["none", "dual", "entropy"]),
                       "stream": i % 4 == 0})
    bodies = [{k: v for k, v in b.items() if v is not None} for b in bodies]

    def call(body):
        response = requests.post(f"{url}/v1/completions", json=body, stream=body["stream"], timeout=300)
        assert response.status_code == 200, response.text
        if body["stream"]:
            return "".join(e["choices"][0]["text"] for e in _sse(response))
        return response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(call, bodies))
    reference = LLM(chat_folders["llada"], **ENGINE)
    params = [SamplingParams(gen_length=b["max_tokens"], block_length=8, temperature=b["temperature"], seed=b["seed"],
                             threshold=b.get("threshold"), cache_policy=b["cache_policy"]) for b in bodies]
    expected = reference.generate([b["prompt"] for b in bodies], params, use_tqdm=False)
    assert texts == [o.text for o in expected]


def test_half_sent_bodies_get_408_from_serve_and_whole_requests_are_answered_meanwhile(url):
    """Through Serve's proxy (with dengine's middleware, as `dengine serve` starts it): 30 connections that send
    headers and 10 body bytes get their 408 after the body timeout; a whole request meanwhile is answered."""
    import asyncio
    from urllib.parse import urlparse

    from dengine.bench.chaos import slow_connections
    from dengine.serve.proxy import BODY_TIMEOUT_S

    address = urlparse(url)

    async def both():
        slow = asyncio.create_task(slow_connections(address.hostname, address.port, 30, hold_s=BODY_TIMEOUT_S + 30))
        await asyncio.sleep(1)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Add: a3 b4"}], "max_tokens": 32}
        whole = await asyncio.to_thread(requests.post, f"{url}/v1/chat/completions", json=chat, timeout=60)
        return await slow, whole

    slow, whole = asyncio.run(both())
    assert slow["ended"] == {"408": 30}, slow
    assert BODY_TIMEOUT_S <= slow["answered_s"]["p50"] / 1e3 < BODY_TIMEOUT_S + 20
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"]


def test_bad_requests_get_400_over_http_and_serving_continues(url):
    for body in (b"{", b'{"prompt": 3}', b'{"prompt": "x", "bogus": true}', b'{"prompt": "x", "max_tokens": -1}',
                 b'{"prompt": "x", "max_tokens": 100000}'):
        response = requests.post(f"{url}/v1/completions", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 8}, timeout=60).ok


def _text(response, stream: bool) -> str:
    assert response.status_code == 200, response.text
    if stream:
        return "".join(e["choices"][0]["text"] for e in _sse(response))
    return response.json()["choices"][0]["text"]


def test_killing_a_replica_with_requests_in_flight_loses_none_and_resumed_streams_are_exact(url, chat_folders, seed):
    """16 requests in flight, half streamed; the replica serving the first stream dies after its first block:
    every request completes with the text of an uninterrupted run (streams resumed on the other replica)."""
    rng = random.Random(seed)
    bodies = [{"prompt": f"Add: a{rng.randint(1, 9)} b{rng.randint(1, 9)}", "max_tokens": 64, "block_length": 8,
               "temperature": rng.choice([0.0, 1.0]), "seed": rng.randrange(1000), "stream": i % 2 == 0,
               "cache_policy": rng.choice(["none", "entropy"])} for i in range(16)]
    bodies[0]["max_tokens"] = 512  # the stream to break: 63 blocks still to decode when its replica dies
    with ThreadPoolExecutor(15) as pool:
        rest = [pool.submit(lambda b: _text(requests.post(f"{url}/v1/completions", json=b, stream=b["stream"],
                                                          timeout=300), b["stream"]), body) for body in bodies[1:]]
        first = requests.post(f"{url}/v1/completions", json=bodies[0], stream=True, timeout=300)
        victim = f"SERVE_REPLICA::dengine#engine#{first.headers['X-Dengine-Replica']}"
        actor = ray.get_actor(victim, namespace="serve")
        lines = first.iter_lines(decode_unicode=True)
        before = [line for line in itertools.islice(lines, 2) if line]  # the first block's event
        ray.kill(actor, no_restart=True)
        after = [line for line in lines if line]
        texts = [future.result() for future in rest]
    events = [json.loads(line[6:]) for line in (before + after)[:-1]]
    assert (before + after)[-1] == "data: [DONE]" and all("error" not in e for e in events)
    texts.insert(0, "".join(e["choices"][0]["text"] for e in events))
    reference = LLM(chat_folders["llada"], **ENGINE)
    params = [SamplingParams(gen_length=b["max_tokens"], block_length=8, temperature=b["temperature"],
                             seed=b["seed"], cache_policy=b["cache_policy"]) for b in bodies]
    expected = reference.generate([b["prompt"] for b in bodies], params, use_tqdm=False)
    assert texts == [o.text for o in expected]
    stats = serve.get_deployment_handle("control", "dengine").stats.remote().result()
    assert stats["resumed_streams"] >= 1 and stats["in_flight"] == 0 and stats["routers"] == ROUTERS, stats
    _wait_healthy(url, 2)
    assert victim not in _replicas()


def _engine_totals(url: str) -> dict[str, int]:
    """The engine replicas' counters summed (GETs land on any replica; ask until both answered)."""
    seen: dict[str, dict] = {}
    deadline = time.time() + 60
    while len(seen) < 2 and time.time() < deadline:
        body = requests.get(f"{url}/health", timeout=10).json()
        seen[body["replica"]] = body["engine"]
    return {key: sum(stats[key] for stats in seen.values()) for key in ("running", "aborted_requests")}


def test_a_killed_router_loses_nothing_and_the_engines_abort_its_requests(url):
    """Two routers; one is killed (SIGKILL) while it holds long streams and whole (non-streamed) requests. Every
    stream ends with [DONE] and every whole request is answered 200, each with the same text as when sent again
    on a quiet service (dengine's proxy middleware sends the dead router's requests again and resumes its
    streams); new requests are answered throughout; the engines abort what the dead router held instead of
    decoding it to the end."""
    control = serve.get_deployment_handle("control", "dengine")
    routers = control.routers.remote().result()
    assert len(routers) == ROUTERS, routers
    aborted_before = _engine_totals(url)["aborted_requests"]
    streams = []
    for i in range(12):  # until both routers hold some
        body = {"prompt": "Add: a3 b4", "max_tokens": 480, "block_length": 8, "stream": True, "stop_at_eos": False}
        if i % 2:
            body["seed"] = i  # the others get theirs from the proxy
        response = requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300)
        lines = response.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line)
        streams.append((response.headers["X-Dengine-Router"], response, lines, first))
        if len({router for router, *_ in streams}) == 2 and len(streams) >= 4:
            break
    victim = streams[0][0]
    name = f"SERVE_REPLICA::dengine#dengine#{victim}"
    held_streams = sum(router == victim for router, *_ in streams)
    wholes = [{"prompt": f"Add: a{i} b5", "max_tokens": 320, "block_length": 8, "stop_at_eos": False, "seed": 7 + i}
              for i in range(6)]
    with ThreadPoolExecutor(len(wholes)) as pool:
        answers = [pool.submit(requests.post, f"{url}/v1/completions", json=body, timeout=300) for body in wholes]
        deadline, held = time.time() + 20, 0
        while time.time() < deadline:  # until the victim reports holding whole requests too
            held = control.routers.remote().result()[name]["in_flight"] - held_streams
            if held >= 1:
                break
            time.sleep(0.1)
        assert held >= 1, "no whole request went to the router to be killed"
        os.kill(routers[name]["pid"], signal.SIGKILL)
        killed = time.time()
        statuses = []
        while time.time() < killed + 10:  # new requests while Serve notices the death
            response = requests.post(f"{url}/v1/completions", json={"prompt": "Add: a1 b2", "max_tokens": 8},
                                     timeout=60)
            statuses.append((round(time.time() - killed, 2), response.status_code))
        answers = [future.result() for future in answers]
    print("statuses after the kill", statuses, "whole requests the victim held", held)
    assert all(status == 200 for _, status in statuses), statuses
    assert [a.status_code for a in answers] == [200] * len(wholes), [(a.status_code, a.text[:200]) for a in answers]
    texts = []
    for router, response, lines, first in streams:
        events = [first] + [line for line in lines if line]
        assert events[-1] == "data: [DONE]" and not any('"error"' in line for line in events), events[-3:]
        chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
        assert len({(chunk["id"], chunk["created"]) for chunk in chunks}) == 1, "one response id and time throughout"
        texts.append("".join(chunk["choices"][0]["text"] for chunk in chunks))
    deadline = time.time() + 30
    while (totals := _engine_totals(url))["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert totals["running"] == 0
    assert totals["aborted_requests"] - aborted_before >= held_streams + held, (totals, held_streams, held)
    _wait_healthy(url, 2)
    assert name not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    quiet = [requests.post(f"{url}/v1/completions", json=body, timeout=300) for body in wholes]
    assert [a.json()["choices"][0]["text"] for a in answers] == [q.json()["choices"][0]["text"] for q in quiet]
    for (_, response, _, first), text in zip(streams, texts):  # a stream with the seed the proxy gave it
        seed = json.loads(response.request.body).get("seed")
        if seed is not None:
            body = {"prompt": "Add: a3 b4", "max_tokens": 480, "block_length": 8, "stop_at_eos": False, "seed": seed}
            assert requests.post(f"{url}/v1/completions", json=body, timeout=300).json()["choices"][0]["text"] == text


def test_data_parallel_matches_a_single_replica(cluster, chat_folders, seed):
    serve.shutdown()  # give the replicas' CPUs back
    rng = random.Random(seed)
    prompts = [f"Add: a{rng.randint(1, 9)} b{rng.randint(1, 9)} c{rng.randint(1, 9)}" for _ in range(10)]
    params = [SamplingParams(gen_length=16, block_length=8, temperature=rng.choice([0.0, 1.0])) for _ in prompts]
    single = LLM(chat_folders["dream"], **ENGINE).generate(prompts, params, use_tqdm=False)
    parallel_llm = LLM(chat_folders["dream"], data_parallel_size=2, **ENGINE)
    try:
        parallel = parallel_llm.generate(prompts, params, use_tqdm=False)
        with pytest.raises(ValueError, match="prompt 1"):
            parallel_llm.generate(["ok", ""], use_tqdm=False)
    finally:
        parallel_llm.shutdown()
    assert [o.token_ids for o in parallel] == [o.token_ids for o in single]
    assert [o.text for o in parallel] == [o.text for o in single]
