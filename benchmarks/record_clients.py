"""Record the HTTP requests that real OpenAI-API clients send (issue 32).

A tiny recording server (stdlib ``http.server``) answers like a minimal OpenAI-compatible
server -- /health, /v1/models, /v1/completions and /v1/chat/completions, streamed (SSE) or
not -- and writes down every request it gets: method, path, the few headers a server has
to care about (content-type, accept, ...; never an API key's value), and the exact JSON
body. This script then drives each client against it and writes one JSON file per client
scenario into ``--out``: a list of ``{"client", "method", "path", "headers", "body"}``
records, identical requests once, at most ``MAX_BODIES`` distinct POST bodies each. The
replay tests (tests/) send these bodies to the dengine app.

The clients live in their own virtual environment so that their dependencies stay out of
the project's:

    python -m venv --system-site-packages .venv-clients
    .venv-clients/bin/pip install -c constraints-cpu.txt guidellm lm-eval langchain-openai litellm
    .venv-clients/bin/python benchmarks/record_clients.py --out tests/data/clients

Recorded with openai 3.63.0, guidellm 0.8.1, lm_eval 0.4.13, langchain-openai 1.8.1
(langchain-core 1.8.3), litellm 1.110.2, under Python 3.11. Nothing is downloaded while
recording: guidellm and lm-eval get the tokenizer of the bundled model
``dengine/assets/llada-sudoku`` (a local folder, not a hub name), lm-eval reads tasks
written here to a temporary folder with local JSONL data, and HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE / LITELLM_LOCAL_MODEL_COST_MAP are set. Every client sends the model
name ``llada-sudoku`` (what ``dengine serve`` serves by
default) and the API key ``sk-placeholder``; lm-eval's token-id prompts are ids of that
model's tokenizer, so they replay only against a model with the same vocabulary.
``--only openai,lm_eval`` records a subset.

The guidellm and lm-eval command lines are printed as they run, so that they can be pointed
at a real server by changing the URL.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "dengine" / "assets" / "llada-sudoku"   # char-level tokenizer with a chat template
MODEL = "llada-sudoku"
API_KEY = "sk-placeholder"
MAX_BODIES = 5
# Headers that matter to the server; any other header (user-agent, x-stainless-*, ...) is
# client bookkeeping whose values change from version to version.
KEPT_HEADERS = ("content-type", "accept", "accept-encoding", "content-encoding", "transfer-encoding",
                "authorization")
BIN = Path(sys.executable).parent   # the guidellm and lm_eval scripts of this environment

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  LITELLM_LOCAL_MODEL_COST_MAP="True", TOKENIZERS_PARALLELISM="false",
                  OPENAI_API_KEY=API_KEY)


def version(*dists: str) -> str:
    return " ".join(f"{d} {importlib.metadata.version(d)}" for d in dists)


# ---------------------------------------------------------------- the recording server

class Recorder:
    """What the server saw, by scenario (the driver sets ``scenario`` before each client)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.scenario = None
        self.client = None
        self.records: dict[str, list[dict]] = {}

    def add(self, method: str, path: str, headers: dict, body) -> None:
        with self.lock:
            if self.scenario is None:
                return
            kept = self.records.setdefault(self.scenario, [])
            record = {"client": self.client, "method": method, "path": path, "headers": headers, "body": body}
            if any(r["method"] == method and r["path"] == path and r["body"] == body for r in kept):
                return
            if method == "POST" and sum(r["method"] == "POST" for r in kept) >= MAX_BODIES:
                return
            kept.append(record)


RECORDER = Recorder()


def _prompts(body: dict) -> list:
    """The prompts of a /v1/completions body: a string, a list of strings, token ids, lists of ids."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return prompt
    return [prompt]


def _logprobs_completion(prompt, echo: bool, generated: str, top: int) -> dict:
    """Legacy completions logprobs: one entry per (echoed prompt +) generated token; every
    character of a string prompt, or every id of a token prompt, counts as one token."""
    tokens = ([str(t) for t in prompt] if isinstance(prompt, list) else list(prompt)) if echo else []
    tokens += list(generated)
    tops = [{t: -0.5, **{f"alt{k}": -2.0 - k for k in range(max(top, 1) - 1)}} for t in tokens]
    logps = [-0.5] * len(tokens)
    if echo and tokens:      # like OpenAI: the first prompt token has no logprob
        logps[0], tops[0] = None, None
    return {"tokens": tokens, "token_logprobs": logps, "top_logprobs": tops,
            "text_offset": list(range(len(tokens)))}


def _logprobs_chat(text: str, top: int) -> dict:
    return {"content": [{"token": c, "logprob": -0.5, "bytes": list(c.encode()),
                         "top_logprobs": [{"token": c, "logprob": -0.5, "bytes": list(c.encode())}]
                         + [{"token": f"alt{k}", "logprob": -2.0 - k, "bytes": None} for k in range(top - 1)]}
                        for c in text]}


def answer(path: str, body: dict) -> tuple[list[dict], dict]:
    """(SSE chunks, non-streamed response) of a minimal server that always says 'ok'."""
    chat = path.endswith("/chat/completions")
    n = body.get("n") or 1
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    text = "ok"[: max_tokens] if isinstance(max_tokens, int) else "ok"
    created, model = int(time.time()), body.get("model") or MODEL
    head = {"id": "rec-1", "created": created, "model": model}
    choices, deltas = [], []
    if chat:
        top = body.get("top_logprobs") or 1
        for i in range(n):
            lp = _logprobs_chat(text, top) if body.get("logprobs") else None
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": "stop"})
            deltas += [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
                       {"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None},
                       {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        obj, chunk_obj = "chat.completion", "chat.completion.chunk"
    else:
        k = 0
        for prompt in _prompts(body):
            for _ in range(n):
                shown = (prompt if isinstance(prompt, str) else "") + text if body.get("echo") else text
                lp = (_logprobs_completion(prompt, bool(body.get("echo")), text, body["logprobs"])
                      if body.get("logprobs") is not None else None)
                choices.append({"index": k, "text": shown, "logprobs": lp, "finish_reason": "length"})
                deltas += [{"index": k, "text": shown, "logprobs": lp, "finish_reason": None},
                           {"index": k, "text": "", "logprobs": None, "finish_reason": "length"}]
                k += 1
        prompt_tokens = sum(len(p) for p in _prompts(body))
        obj, chunk_obj = "text_completion", "text_completion"
    completion_tokens = len(text) * len(choices)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    full = {**head, "object": obj, "choices": choices, "usage": usage}
    with_usage = (body.get("stream_options") or {}).get("include_usage")
    chunks = [{**head, "object": chunk_obj, "choices": [d], **({"usage": None} if with_usage else {})}
              for d in deltas]
    if with_usage:
        chunks.append({**head, "object": chunk_obj, "choices": [], "usage": usage})
    return chunks, full


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive; every answer carries a Content-Length

    def log_message(self, *args):   # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return data
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _headers(self) -> dict:
        kept = {}
        for name in KEPT_HEADERS:
            if (value := self.headers.get(name)) is not None:
                kept[name] = "Bearer <API_KEY>" if name == "authorization" else value
        return kept

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        self._read_body()
        RECORDER.add("GET", self.path, self._headers(), None)
        if self.path.rstrip("/").endswith("/models"):
            self._json({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                     "owned_by": "dengine"}]})
        elif self.path == "/health":
            self._json({})
        else:
            self._json({"error": {"message": "not found"}}, 404)

    def do_POST(self):
        raw = self._read_body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"<not JSON>": raw.decode(errors="replace")}
        RECORDER.add("POST", self.path, self._headers(), body)
        path = self.path.split("?")[0]
        if not path.endswith(("/completions", "/chat/completions")) or not isinstance(body, dict):
            return self._json({"error": {"message": "not found"}}, 404)
        chunks, full = answer(path, body)
        if body.get("stream"):
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            self._send(200, sse.encode(), "text/event-stream")
        else:
            self._json(full)


@contextlib.contextmanager
def scenario(name: str, client: str):
    RECORDER.scenario, RECORDER.client = name, client
    print(f"--- {name} ({client})", flush=True)
    try:
        yield
    except Exception as exc:   # record what was sent before a client gave up, and go on
        print(f"    {name}: client raised {type(exc).__name__}: {exc}", flush=True)
    finally:
        RECORDER.scenario = None


def run_command(cmd: list[str], cwd: str) -> None:
    print("    $ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        print(f"    exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}", flush=True)


# ---------------------------------------------------------------- the clients

def record_openai(base: str, tmp: str) -> None:
    import openai
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    name = version("openai")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say ok."}]
    chat = dict(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0.7, seed=1,
                user="user-1", stop=["\n"], n=2, logprobs=True, top_logprobs=3)
    with scenario("openai_chat", name):
        client.chat.completions.create(**chat)
        client.chat.completions.create(model=MODEL, messages=messages[1:], max_tokens=8)
    with scenario("openai_chat_stream", name):
        for _ in client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}):
            pass
        for _ in client.chat.completions.create(model=MODEL, messages=messages[1:], stream=True):
            pass
    completion = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, echo=True, logprobs=2,
                      stop=["\n", "."], seed=1, n=2, temperature=0.7)
    with scenario("openai_completions", name):
        client.completions.create(**completion)
        client.completions.create(model=MODEL, prompt="1 2 3", max_tokens=4)
    with scenario("openai_completions_stream", name):
        for _ in client.completions.create(**completion, stream=True, stream_options={"include_usage": True}):
            pass
        for _ in client.completions.create(model=MODEL, prompt="1 2 3", max_tokens=4, stream=True):
            pass


def record_guidellm(base: str, tmp: str) -> None:
    name = version("guidellm")
    for request_format, tag in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions")):
        for stream in ("true", "false"):
            cmd = [str(BIN / "guidellm"), "run",
                   "--backend", f"kind=openai_http,target={base},model={MODEL},"
                                f"request_format={request_format},stream={stream}",
                   "--tokenizer", f"kind=huggingface_auto,model={TOKENIZER}",
                   "--profile", "kind=concurrent,streams=1",
                   "--constraint", "kind=max_requests,count=3",
                   "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
                   "--output", f"kind=json,path={tmp}/guidellm-{tag}-{stream}.json",
                   "--disable-console-interactive"]
            with scenario(f"guidellm_{tag}" + ("_stream" if stream == "true" else ""), name):
                run_command(cmd, tmp)
                state = json.loads(Path(f"{tmp}/guidellm-{tag}-{stream}.json").read_text())
                state = state["benchmarks"][0]["scheduler_state"]
                print(f"    {state['successful_requests']} requests succeeded, {state['errored_requests']} failed")


LM_EVAL_TASKS = {
    "gen.jsonl": [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "Name a primary color.", "answer": "red"}],
    "mc.jsonl": [{"question": "2 + 2 =", "choices": [" 3", " 4", " 5"], "label": 1},
                 {"question": "The sky is", "choices": [" blue", " green"], "label": 0}],
    "dengine_gen.yaml": """task: dengine_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""",
    "dengine_mc.yaml": """task: dengine_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
}


def record_lm_eval(base: str, tmp: str) -> None:
    tasks = Path(tmp) / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    for file, content in LM_EVAL_TASKS.items():
        text = content.format(dir=tasks) if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
        (tasks / file).write_text(text)
    name = version("lm_eval")
    common = ["--include_path", str(tasks), "--limit", "2", "--output_path", f"{tmp}/lm_eval_out"]
    completions = f"model={MODEL},base_url={base}/v1/completions,tokenizer_backend=huggingface,tokenizer={TOKENIZER}"
    chat = f"model={MODEL},base_url={base}/v1/chat/completions"
    runs = [   # (scenario, --model, --model_args, --tasks, more options)
        # the default: prompts sent as token ids (lists of lists of ids)
        ("lm_eval_completions_generate", "local-completions", completions, "dengine_gen", []),
        ("lm_eval_completions_loglikelihood", "local-completions", completions, "dengine_mc", []),
        # prompts sent as text, two prompts a request
        ("lm_eval_completions_text_batched", "local-completions", completions + ",tokenized_requests=False",
         "dengine_gen,dengine_mc", ["--batch_size", "2"]),
        ("lm_eval_chat", "local-chat-completions", chat, "dengine_gen", ["--apply_chat_template"]),
    ]
    for scenario_name, model, model_args, task_names, extra in runs:
        cmd = [str(BIN / "lm_eval"), "run", "--model", model, "--model_args", model_args,
               "--tasks", task_names, *common, *extra]
        with scenario(scenario_name, name):
            run_command(cmd, tmp)


def record_langchain(base: str, tmp: str) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    name = version("langchain-openai", "langchain-core")
    messages = [SystemMessage("You are terse."), HumanMessage("Say ok.")]
    llm = ChatOpenAI(model=MODEL, base_url=f"{base}/v1", api_key=API_KEY, max_tokens=8, temperature=0.2,
                     max_retries=0)
    with scenario("langchain_chat", name):
        llm.invoke(messages, stop=["\n"])
        ChatOpenAI(model=MODEL, base_url=f"{base}/v1", api_key=API_KEY, max_completion_tokens=8,
                   max_retries=0).invoke([HumanMessage(content=[{"type": "text", "text": "Say"},
                                                                {"type": "text", "text": " ok."}])])
    with scenario("langchain_chat_stream", name):
        for _ in llm.stream(messages, stop=["\n"]):
            pass
        for _ in ChatOpenAI(model=MODEL, base_url=f"{base}/v1", api_key=API_KEY, max_tokens=8,
                            stream_usage=True, max_retries=0).stream(messages):
            pass


def record_litellm(base: str, tmp: str) -> None:
    import litellm
    name = version("litellm")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say ok."}]
    kwargs = dict(model=f"openai/{MODEL}", api_base=f"{base}/v1", api_key=API_KEY, messages=messages,
                  max_tokens=8, temperature=0.2, stop=["\n"], seed=1)
    with scenario("litellm_chat", name):
        litellm.completion(**kwargs)
    with scenario("litellm_chat_stream", name):
        for _ in litellm.completion(**kwargs, stream=True, stream_options={"include_usage": True}):
            pass
    with scenario("litellm_completions", name):
        litellm.text_completion(model=f"openai/{MODEL}", api_base=f"{base}/v1", api_key=API_KEY,
                                prompt="The capital of France is", max_tokens=8, temperature=0.2)


CLIENTS = {"openai": record_openai, "guidellm": record_guidellm, "lm_eval": record_lm_eval,
           "langchain": record_langchain, "litellm": record_litellm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "tests" / "data" / "clients"))
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--only", default=",".join(CLIENTS), help="comma-separated: " + ",".join(CLIENTS))
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for client in args.only.split(","):
            CLIENTS[client](base, tmp)
    server.shutdown()
    for name, records in RECORDER.records.items():
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
        text = text.replace(str(REPO), "<repo>")   # none expected: tokenizer paths never reach a body
        (out / f"{name}.json").write_text(text)
        print(f"{out / name}.json: {len(records)} requests, {len(text)} bytes")


if __name__ == "__main__":
    main()
