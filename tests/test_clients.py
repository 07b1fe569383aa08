"""The requests real OpenAI clients send, replayed against the app serving the embedded model.

tests/data/clients/ holds what the openai SDK, guidellm, lm-eval (local-completions and local-chat-completions),
LangChain's ChatOpenAI and LiteLLM actually sent, recorded by benchmarks/record_clients.py (versions in each
record). Every body is answered (a 200 whose shape the openai SDK's own types accept, with as many choices as
prompts x n, logprobs where asked, usage where asked) except the one thing a diffusion model cannot give: the
logprobs of an echoed prompt (lm-eval's loglikelihood requests), refused with a 400 that names the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dengine import LLMEngine, SamplingParams
from dengine.assets import resolve_model
from dengine.async_engine import AsyncLLMEngine
from dengine.serve.server import OpenAIServer, create_app
from dengine.tasks import generation_lengths, task_of_folder

RECORDS = sorted((Path(__file__).parent / "data" / "clients").glob("*.json"))
MODEL = "llada-sudoku"


@pytest.fixture(scope="module")
def client():
    engine = LLMEngine(resolve_model(MODEL))
    gen_length, block_length = generation_lengths(task_of_folder(engine.model_path))  # as `dengine serve`
    defaults = SamplingParams(gen_length=gen_length, block_length=block_length)
    with TestClient(create_app(OpenAIServer(AsyncLLMEngine(engine), MODEL, defaults))) as c:
        yield c


def _events(response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line[6:]) for line in lines[:-1]]


def _prompts(body: dict) -> int:
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1


def test_every_client_was_recorded():
    clients = {json.loads(path.read_text())[0]["client"].split()[0] for path in RECORDS}
    assert {"openai", "guidellm", "lm_eval", "langchain-openai", "litellm"} <= clients, clients


@pytest.mark.parametrize("path", RECORDS, ids=lambda path: path.stem)
def test_recorded_client_requests_are_answered_as_the_client_expects(client, path):
    for record in json.loads(path.read_text()):
        if record["method"] == "GET":
            assert client.get(record["path"]).status_code == 200, record
            continue
        body, chat = record["body"], record["path"].endswith("/chat/completions")
        headers = {k: v for k, v in record["headers"].items() if k in ("content-type", "accept")}
        response = client.post(record["path"], content=json.dumps(body), headers=headers)
        if body.get("echo") and body.get("logprobs") is not None:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "logprobs" and "echoed prompt" in error["message"]
            continue
        assert response.status_code == 200, (record["client"], body, response.text)
        choices = _prompts(body) * body.get("n", 1)
        wants_logprobs = body.get("logprobs") not in (None, False)
        if not body.get("stream"):
            answer = (ChatCompletion if chat else Completion).model_validate(response.json())
            assert [c.index for c in answer.choices] == list(range(choices))
            assert all((c.logprobs is not None) == wants_logprobs for c in answer.choices)
            assert answer.usage.completion_tokens <= choices * (body.get("max_completion_tokens")
                                                                or body.get("max_tokens"))
            if body.get("ignore_eos"):  # load testers fix the output length this way
                assert answer.usage.completion_tokens == choices * (body.get("max_tokens")
                                                                    or body.get("max_completion_tokens"))
            continue
        events = _events(response)
        if chat:
            for event in events:
                ChatCompletionChunk.model_validate(event)
        indices = {c["index"] for event in events for c in event["choices"]}
        assert indices == set(range(choices))
        finished = [c for event in events for c in event["choices"] if c["finish_reason"] is not None]
        assert sorted(c["index"] for c in finished) == list(range(choices))
        assert all(c["finish_reason"] in ("stop", "length") for c in finished)
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
        if options.get("continuous_usage_stats"):
            counts = [event["usage"]["completion_tokens"] for event in events]
            assert counts == sorted(counts), "the usage so far only grows"
        if wants_logprobs:
            assert any(c.get("logprobs") for event in events for c in event["choices"])
