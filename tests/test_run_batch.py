"""dengine run-batch: OpenAI's batch formats, bad lines, duplicates, resume after a kill, and a two-node Ray cluster
losing a node mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dengine.assets import resolve_model
from dengine.async_engine import AsyncLLMEngine
from dengine.sampling_params import SamplingParams
from dengine.serve.batch import run_batch
from dengine.serve.server import OpenAIServer, create_app
from dengine.tasks import get_task

MODEL = "llada-sudoku"
ENGINE = {"dtype": "float32", "max_num_seqs": 16}
OUTPUT_FIELDS = {"id", "custom_id", "response", "error"}


def _line(custom_id, question: str, chat: bool, **fields) -> str:
    body = ({"model": MODEL, "messages": [{"role": "user", "content": question}]} if chat
            else {"model": MODEL, "prompt": question, "max_tokens": 24})
    return json.dumps({"custom_id": custom_id, "method": "POST",
                       "url": "/v1/chat/completions" if chat else "/v1/completions", "body": {**body, **fields}})


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _questions(n: int) -> list:
    return get_task("sudoku4").held_out(n)


def test_results_follow_openai_batch_formats_and_a_bad_line_never_stops_the_job(tmp_path):
    problems = _questions(4)
    bad_field = {"model": MODEL, "prompt": "x", "frobnicate": 1}
    lines = [_line(f"chat-{i}", p.question, chat=True) for i, p in enumerate(problems[:2])]
    lines += [_line("completion", problems[2].question, chat=False),
              _line("two", problems[3].question, chat=True, n=2, temperature=0.8, seed=3),
              "{not json",
              json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
              json.dumps({"custom_id": "no-method", "url": "/v1/completions", "body": {"prompt": "x"}}),
              json.dumps({"custom_id": "bad-field", "method": "POST", "url": "/v1/completions", "body": bad_field}),
              _line("streamed", problems[0].question, chat=False, stream=True)]
    summary = run_batch(_write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", MODEL, engine_kwargs=ENGINE,
                        use_tqdm=False)
    assert summary["written"] == len(lines) and summary["errors"] == 5
    out = _read(tmp_path / "out.jsonl")
    assert all(set(o) == OUTPUT_FIELDS and o["id"].startswith("batch_req_") for o in out)
    by_id = {o["custom_id"]: o for o in out}
    for i, problem in enumerate(problems[:2]):
        response = by_id[f"chat-{i}"]["response"]
        assert response["status_code"] == 200 and by_id[f"chat-{i}"]["error"] is None
        assert response["body"]["object"] == "chat.completion" and response["request_id"].startswith("req_")
        assert problem.check(response["body"]["choices"][0]["message"]["content"])
    assert by_id["completion"]["response"]["body"]["object"] == "text_completion"
    assert len(by_id["two"]["response"]["body"]["choices"]) == 2
    assert by_id[None]["response"] is None and "malformed" in by_id[None]["error"]["message"]
    for custom_id in ("wrong-url", "no-method"):
        assert by_id[custom_id]["response"] is None and by_id[custom_id]["error"]["code"] == "invalid_request"
    assert by_id["streamed"]["response"]["status_code"] == 400
    assert by_id["streamed"]["response"]["body"]["error"]["param"] == "stream"

    # the server's own answer to the same body, word for word
    engine = AsyncLLMEngine.from_model(resolve_model(MODEL), **ENGINE)
    with TestClient(create_app(OpenAIServer(engine, MODEL, SamplingParams(gen_length=24, block_length=24)))) as c:
        served = c.post("/v1/completions", json=bad_field)
    assert by_id["bad-field"]["response"]["status_code"] == served.status_code == 400
    assert by_id["bad-field"]["response"]["body"] == served.json()


def test_duplicate_custom_ids_are_refused_before_anything_runs(tmp_path):
    problems = _questions(3)
    lines = [_line("a", problems[0].question, chat=True), _line("b", problems[1].question, chat=True),
             _line("a", problems[2].question, chat=True)]
    with pytest.raises(ValueError, match="custom_id must be unique.*'a'"):
        run_batch(_write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", MODEL, engine_kwargs=ENGINE)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_killed_job_resumes_without_losing_or_repeating_a_row(tmp_path):
    """SIGKILL mid-job leaves whole lines (a torn last one is cut off); the rerun answers only what is missing."""
    problems = _questions(48)
    source = _write(tmp_path / "in.jsonl", [_line(f"q{i}", p.question, chat=True) for i, p in enumerate(problems)])
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen([sys.executable, "-m", "dengine.cli", "run-batch", "-i", str(source), "-o", str(out),
                            "--dtype", "float32", "--max-num-seqs", "4", "--no-tqdm"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    before = out.read_text().count("\n")
    assert 6 <= before < len(problems), "killed mid-job"
    with out.open("a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "q4')  # what a write cut by the kill would leave
    summary = run_batch(source, out, MODEL, engine_kwargs=ENGINE, use_tqdm=False)
    assert summary["skipped"] == before and summary["written"] == len(problems) - before
    results = _read(out)
    assert sorted(r["custom_id"] for r in results) == sorted(f"q{i}" for i in range(len(problems)))
    assert all(r["response"]["status_code"] == 200 for r in results)
    right = sum(problems[int(r["custom_id"][1:])].check(r["response"]["body"]["choices"][0]["message"]["content"])
                for r in results)
    assert right >= 0.9 * len(problems)


def test_two_node_cluster_spreads_rows_and_a_removed_node_loses_none(tmp_path):
    """Ray Data over a local two-node cluster: rows are answered on both nodes' engines; the worker node removed
    mid-job, its rows are retried on the other node and every row is written exactly once, each answer equal to
    a single engine's."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    problems = _questions(40)
    source = _write(tmp_path / "in.jsonl", [_line(f"q{i}", p.question, chat=True) for i, p in enumerate(problems)])
    expected = tmp_path / "single.jsonl"
    run_batch(source, expected, MODEL, engine_kwargs=ENGINE, use_tqdm=False)
    single = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in _read(expected)}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=1)
    out, result, failure = tmp_path / "out.jsonl", {}, []
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        worker_id = worker.node_id

        def job() -> None:
            try:
                result.update(run_batch(source, out, MODEL, replicas=2, engine_kwargs=ENGINE, num_cpus=1,
                                        batch_size=2, ray_address=cluster.address, use_tqdm=False))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                failure.append(exc)

        thread = threading.Thread(target=job)
        thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
            time.sleep(0.1)
        written_before = out.read_text().count("\n")
        cluster.remove_node(worker)
        thread.join(timeout=400)
        assert not thread.is_alive() and not failure, failure
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert 8 <= written_before < len(problems), "the node was removed mid-job"
    results = _read(out)
    assert sorted(r["custom_id"] for r in results) == sorted(single), "every row once"
    assert {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in results} == single
    assert worker_id in result["rows_per_node"] and len(result["rows_per_node"]) == 2, result["rows_per_node"]


def test_the_readme_batch_file_is_answered_with_its_one_refusal(tmp_path):
    """examples/batch_requests.jsonl, as the README runs it: every Sudoku answered right, n 2 gives two choices,
    and the request with a penalty is refused with the server's reason."""
    source = Path(__file__).parent.parent / "examples" / "batch_requests.jsonl"
    summary = run_batch(source, tmp_path / "results.jsonl", engine_kwargs=ENGINE, use_tqdm=False)
    assert summary["written"] == 8 and summary["errors"] == 1
    by_id = {r["custom_id"]: r for r in _read(tmp_path / "results.jsonl")}
    problems = _questions(8)
    for i in range(6):
        assert problems[i].check(by_id[f"sudoku-{i}"]["response"]["body"]["choices"][0]["message"]["content"])
    assert len(by_id["sampled-twice"]["response"]["body"]["choices"]) == 2
    refused = by_id["refused"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "presence_penalty"
