"""The serving load benchmark against a real HTTP server on loopback (uvicorn in a thread, no Ray)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

from dengine import LLMEngine, SamplingParams
from dengine.assets import resolve_model
from dengine.async_engine import AsyncLLMEngine
from dengine.bench import serve_load
from dengine.serve.server import OpenAIServer, create_app


@contextmanager
def _served(folder):
    """An OpenAI server named "tiny" over folder's model on a loopback port, in a thread; yields its URL."""
    engine = LLMEngine(folder, dtype="float32", kv_cache_memory=1 << 24, block_size=8)
    server = OpenAIServer(AsyncLLMEngine(engine), "tiny", SamplingParams(gen_length=32, block_length=8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server_url(chat_folders):
    with _served(chat_folders["llada"]) as url:
        yield url


@pytest.fixture(scope="module")
def reversal_server_url():
    """The embedded digit-reversal model: it answers the benchmark's default questions with digits, never an
    empty answer (a 2-step tiny model may end every answer at once, leaving no output tokens to count)."""
    with _served(resolve_model("llada-reverse")) as url:
        yield url


def test_closed_loop_sweep_measures_every_request(reversal_server_url, tmp_path):
    out = tmp_path / "serve"
    record = serve_load.main(["--url", reversal_server_url, "--sweep-concurrency", "1", "3", "--num-requests", "6",
                              "--max-tokens", "32", "--extra", '{"block_length": 8}', "--out", str(out), "--plot",
                              "--no-tqdm"])
    assert record["model"] == "tiny"
    for result in record["results"]:
        assert result["completed"] == 6 and result["failed"] == 0
        assert result["output_tokens_per_s"] > 0
        assert 0 < result["ttfb_ms"]["p50"] <= result["e2e_ms"]["p50"]
        assert result["e2e_ms"]["p50"] <= result["e2e_ms"]["p90"] <= result["e2e_ms"]["p99"]
    assert record["knee"] is not None
    assert json.loads(out.with_suffix(".json").read_text())["results"][1]["load"] == 3
    assert out.with_suffix(".png").stat().st_size > 0


def test_poisson_arrivals_and_failures_are_counted(server_url):
    record = serve_load.main(["--url", server_url, "--rate", "20", "--num-requests", "4", "--max-tokens", "32",
                              "--extra", '{"block_length": 8, "cache_policy": "dual"}', "--no-tqdm"])
    assert record["results"][0]["completed"] == 4
    bad = serve_load.main(["--url", server_url, "--concurrency", "2", "--num-requests", "3", "--max-tokens", "32",
                           "--extra", '{"block_length": 7}', "--no-tqdm"])  # 32 is not a multiple of 7
    result = bad["results"][0]
    assert result["completed"] == 0 and result["failed"] == 3 and "HTTP 400" in result["errors"][0]


def test_percentiles_by_nearest_rank_and_loopback_only():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert serve_load.percentiles(values) == pytest.approx({"p50": 50.0, "p90": 90.0, "p99": 99.0, "mean": 50.5})
    assert serve_load.percentiles([0.004]) == pytest.approx({"p50": 4.0, "p90": 4.0, "p99": 4.0, "mean": 4.0})
    assert serve_load.percentiles([]) == {}
    with pytest.raises(ValueError, match="not a loopback address"):
        serve_load.check_loopback("http://8.8.8.8:8000")
    serve_load.check_loopback("http://localhost:8000")


def test_chaos_clients_count_abandoned_requests_apart_and_lose_none_on_a_healthy_server(server_url, seed):
    """The chaos benchmark's load loop on a plain server (the replica kill itself is tests/test_serve_ray.py's)."""
    import asyncio

    from dengine.bench import chaos

    bodies = [{"messages": [{"role": "user", "content": f"Add: a{i} b2"}], "max_tokens": 32, "block_length": 8,
               "seed": seed % 1000 + i, "stream": i % 2 == 0} for i in range(12)]
    kills = []
    outcomes, killed_at = asyncio.run(chaos.run_load(server_url, bodies, 4, 0.5, 6, seed, lambda: kills.append(1),
                                                     use_tqdm=False))
    assert kills == [1] and killed_at is not None
    statuses = [o.status for o in outcomes]
    assert "lost" not in statuses, [o.error for o in outcomes]
    assert statuses.count("ok") + statuses.count("abandoned") == 12 and "ok" in statuses
    assert all(o.latency_s > 0 for o in outcomes if o.status == "ok")


@pytest.mark.parametrize("stream", [False, True])
def test_chaos_clients_retry_as_openais_sdk_does(stream):
    """A 500 and a stream cut before [DONE] are sent again (up to --client-retries times), a 400 is not."""
    import asyncio

    import httpx

    from dengine.bench import chaos

    answers = []

    def handler(request: httpx.Request) -> httpx.Response:
        answers.append(request)
        if "bad" in request.content.decode():
            return httpx.Response(400, json={"error": {"message": "bad"}})
        if len(answers) == 1:
            return httpx.Response(500, text="Internal Server Error")
        if len(answers) == 2 and stream:  # cut after one event, as a dead router's stream is
            return httpx.Response(200, content=b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n')
        if stream:
            return httpx.Response(200, content=b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n')
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})

    async def run(body, retries):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await chaos.request_with_retries(client, "http://x", body, None, retries)

    body = {"messages": [], "stream": stream}
    outcome = asyncio.run(run(body, 2))
    assert (outcome.status, outcome.text, outcome.retries) == ("ok", "ok", 2 if stream else 1)
    answers.clear()
    assert asyncio.run(run(body, 0)).status == "lost"
    answers.clear()
    refused = asyncio.run(run({**body, "bad": True}, 2))
    assert refused.status == "lost" and refused.retries == 0 and len(answers) == 1


def test_slow_connections_get_the_body_timeout_and_others_are_answered_meanwhile():
    """The chaos bench's slow clients against dengine's HTTP routes (a short body timeout): every half-sent
    request ends 408, and a whole request sent while they wait is answered at once."""
    import asyncio

    import httpx
    from fastapi.responses import JSONResponse

    from dengine.bench import chaos
    from dengine.serve.server import openai_app

    async def post(path: str, body: bytes, headers) -> JSONResponse:
        return JSONResponse({"echo": json.loads(body)})

    async def get(what: str) -> JSONResponse:
        return JSONResponse({})

    app = openai_app(post, get, max_body_bytes=1 << 20, body_timeout_s=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        async def both():
            slow = asyncio.create_task(chaos.slow_connections("127.0.0.1", port, 40, hold_s=10))
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient() as client:
                start = time.perf_counter()
                whole = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": []})
                waited = time.perf_counter() - start
            return await slow, whole, waited

        slow, whole, waited = asyncio.run(both())
        assert slow["ended"] == {"408": 40}, slow
        assert 1.0 <= slow["answered_s"]["p50"] / 1e3 < 5.0
        assert whole.status_code == 200 and whole.json() == {"echo": {"messages": []}} and waited < 1.0
        short = asyncio.run(chaos.slow_connections("127.0.0.1", port, 3, hold_s=0.2))
        assert short["ended"] == {"waiting": 3}, short
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def test_the_chaos_bench_names_what_died_and_its_memory_hog_takes_and_frees_memory():
    """serve_replicas reads the roles from process titles; memory_hog_until_a_kill takes memory (every page
    written) past the threshold until a replica dies (here the test plays Ray's memory monitor), then frees it."""
    import subprocess
    import sys

    from dengine.bench import chaos

    sleeper = "import time; time.sleep(120)"
    engine = subprocess.Popen([sys.executable, "-c", sleeper, "ray::ServeReplica:dengine:engine"])
    controller = subprocess.Popen([sys.executable, "-c", sleeper, "ray::ServeController"])
    try:
        deadline = time.monotonic() + 30
        while set(chaos.serve_replicas()) < {engine.pid, controller.pid}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        roles = chaos.serve_replicas()
        assert (roles[engine.pid], roles[controller.pid]) == ("engine", "controller")

        def children() -> dict[int, int]:  # pid -> resident bytes of this process's children now
            found = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/status", encoding="ascii") as f:
                        fields = dict(line.split(":", 1) for line in f)
                except OSError:
                    continue
                if int(fields["PPid"]) == os.getpid():
                    found[int(pid)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            return found

        # the spawned hog: a child that was not there before (an earlier test's lingering child, say a Ray
        # process, must not make the stand-in monitor kill before the hog has taken anything)
        earlier = set(children())

        def hog_rss() -> int:
            return sum(rss for pid, rss in children().items() if pid not in earlier)

        def monitor():  # kills the controller first, as Ray's policy by owner group does, then the engine
            deadline = time.monotonic() + 60
            while hog_rss() < 200 << 20:
                assert time.monotonic() < deadline, "the hog did not take its memory"
                time.sleep(0.05)
            controller.kill()
            time.sleep(0.3)
            engine.kill()

        watcher = threading.Thread(target=monitor)
        watcher.start()
        died = chaos.memory_hog_until_a_kill(chaos._machine_used_bytes(), overshoot=256 << 20, timeout=60)
        watcher.join()
        assert died == ["controller", "engine"]
        assert hog_rss() < 100 << 20, "the hog freed its memory"
    finally:
        engine.kill()
        controller.kill()


def test_a_ray_started_to_serve_gets_the_one_at_a_time_memory_policy_unless_the_user_chose(monkeypatch):
    from dengine.serve.deployment import ray_serving_environment

    monkeypatch.delenv("RAY_worker_killing_policy_by_group", raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "7")
    ray_serving_environment()
    assert os.environ["RAY_worker_killing_policy_by_group"] == "true"
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "7"
