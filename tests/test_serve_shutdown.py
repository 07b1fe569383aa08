"""`dengine serve` as a user runs it: SIGTERM drains (503 for new requests, requests in flight finish), then
the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray")
requests = pytest.importorskip("requests")

from dengine import LLM, SamplingParams  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("dengine serve did not become healthy")


def _text(response) -> str:
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["choices"][0]["text"]
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])


def test_sigterm_drains_requests_in_flight_refuses_new_ones_and_exits_0(chat_folders, seed):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dengine.cli", "serve", "--model", str(chat_folders["llada"]), "--port", str(port),
         "--dtype", "float32", "--kv-cache-memory", str(1 << 24), "--grace-period", "120", "--num-cpus", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        _wait_serving(url, process)
        bodies = [{"prompt": f"Add: a{i} b{seed % 9}", "max_tokens": 256 + 128 * (i % 3), "block_length": 8,
                   "temperature": 1.0, "seed": seed % 1000 + i, "stream": i % 2 == 0} for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            first = requests.post(f"{url}/v1/completions", json=bodies[0], stream=True, timeout=300)
            lines = first.iter_lines(decode_unicode=True)
            head = [line for line in (next(lines), next(lines)) if line]
            rest = [pool.submit(lambda b: _text(requests.post(f"{url}/v1/completions", json=b, stream=b["stream"],
                                                              timeout=300)), body) for body in bodies[1:]]
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            deadline = time.time() + 30
            while requests.get(f"{url}/health", timeout=10).status_code != 503:
                assert time.time() < deadline, "the server never started draining"
                time.sleep(0.05)
            refused = requests.post(f"{url}/v1/completions", json=bodies[1], timeout=30)
            tail = [line for line in lines if line]
            texts = [future.result() for future in rest]
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert tail[-1] == "data: [DONE]"
    texts.insert(0, "".join(json.loads(line[6:])["choices"][0]["text"] for line in (head + tail)[:-1]))
    reference = LLM(chat_folders["llada"], dtype="float32")
    params = [SamplingParams(gen_length=b["max_tokens"], block_length=8, temperature=1.0, seed=b["seed"],
                             cache_policy="entropy") for b in bodies]
    assert texts == [o.text for o in reference.generate([b["prompt"] for b in bodies], params, use_tqdm=False)]
    assert process.returncode == 0, out
    assert "every request in flight finished" in out and "dengine: stopped" in out, out
    # the console is for operators: no Ray noise, no colour codes in a log file, no line per request
    for noise in ("Token authentication is enabled", "Connecting to existing Serve app", "graceful_shutdown failed",
                  "\x1b[", "POST /v1/completions", "Traceback"):
        assert noise not in out, (noise, out)
