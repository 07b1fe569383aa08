"""Offline batch: OpenAI batch files in, OpenAI batch results out, through the server's own request handling.

    dengine run-batch -i requests.jsonl -o results.jsonl [--model M] [--replicas N] [--ray-address ADDR]

Input: one JSON object a line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}` with the fields (diffusion extras included) the server accepts. Output: one
line per input line, `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` as
OpenAI's batch API writes them: a request the server refuses has its status and OpenAI-shaped error body under
`response` (the same message the server gives: the bodies go through `OpenAIServer.respond`), a line that is
not a request at all (bad JSON, no custom_id, another url) has `response: null` and an `error`. No line
stops the job.

Results are appended as they finish and flushed, so an interrupted job leaves whole lines (a torn last line
is cut off on resume); running again with the same output file skips the custom_ids already answered.
Duplicate custom_ids in the input are refused before anything runs.

One replica runs in this process. With `--replicas N` (or `--ray-address`) the lines flow through Ray Data: a
streaming read of the input, `map_batches` over N stateful engine actors (`concurrency` N, each with its
`num_cpus` / `num_gpus`), back-pressure from Ray Data's streaming executor, and the results streamed back to
this process, which writes them; a worker that dies has its rows retried elsewhere (`max_restarts`), and the
writer skips a custom_id it has already written, so nothing is lost or written twice. `OpenAIBatchProcessor`
is the same stage for Ray Data users' own pipelines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
from tqdm.auto import tqdm

from dengine.assets import resolve_model, served_name
from dengine.async_engine import AsyncLLMEngine
from dengine.sampling_params import SamplingParams
from dengine.serve import protocol as p
from dengine.serve.server import OpenAIServer

ENDPOINTS = {"/v1/chat/completions": "chat_completions", "/v1/completions": "completions"}
IN_FLIGHT = 64  # requests one replica has queued at once: enough to fill its batches


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One input line (OpenAI's batch input format)."""

    custom_id: str
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


class BatchResponse(msgspec.Struct):
    status_code: int
    request_id: str
    body: msgspec.Raw


class BatchError(msgspec.Struct):
    code: str
    message: str


class BatchOutput(msgspec.Struct):
    """One output line (OpenAI's batch output format)."""

    id: str
    custom_id: str | None
    response: BatchResponse | None
    error: BatchError | None


class Answered(NamedTuple):
    """One input line's result: its custom_id (None if it has none), the output line, whether it succeeded."""

    custom_id: str | None
    output: bytes
    ok: bool


def parse_line(line: str) -> tuple[str | None, BatchRequest | str]:
    """The line's custom_id (whatever else is wrong with it), and the request or why the line is not one; the
    JSON is decoded once."""
    try:
        value = msgspec.json.decode(line)
    except (msgspec.DecodeError, RecursionError) as exc:
        return None, str(exc)
    try:
        return _custom_id(value), msgspec.convert(value, BatchRequest)
    except msgspec.ValidationError as exc:
        return _custom_id(value), str(exc)


def custom_id_of(line: str) -> str | None:
    """The line's custom_id if it has one (for duplicates and resume), whatever else is wrong with it."""
    try:
        return _custom_id(msgspec.json.decode(line))
    except (msgspec.DecodeError, RecursionError):
        return None


def _custom_id(value: Any) -> str | None:
    custom_id = value.get("custom_id") if isinstance(value, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def request_lines(path: Path) -> Iterator[str]:
    """The input's non-blank lines."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line


def check_unique_ids(path: Path) -> int:
    """The number of request lines; ValueError naming the custom_ids that occur more than once."""
    seen, repeated, count = set(), [], 0
    for line in request_lines(path):
        count += 1
        custom_id = custom_id_of(line)
        if custom_id is None:
            continue
        if custom_id in seen and len(repeated) < 5:
            repeated.append(custom_id)
        seen.add(custom_id)
    if repeated:
        raise ValueError(f"{path}: custom_id must be unique within a batch; repeated: "
                         f"{', '.join(map(repr, repeated))}")
    return count


def answered_ids(path: Path) -> set[str]:
    """The custom_ids an earlier run of the job already wrote to path; a torn last line is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(whole))
    return {custom_id for line in whole.decode("utf-8").splitlines() if (custom_id := custom_id_of(line))}


class BatchAnswerer:
    """Answers batch lines with an OpenAIServer over one engine: the server's validation, messages and bodies."""

    def __init__(self, model: str | None, engine_kwargs: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None, model_name: str | None = None) -> None:
        folder = resolve_model(model)
        self.engine = AsyncLLMEngine.from_model(folder, **(engine_kwargs or {}))
        # no memory floor: a batch has no client to push back on; its rows wait in the engine's queue instead
        self.server = OpenAIServer(self.engine, model_name or served_name(model),
                                   SamplingParams(**(defaults or default_lengths(folder))), memory_floor=0)

    async def answer(self, line: str) -> Answered:
        """The result of one input line."""
        custom_id, request = parse_line(line)
        if isinstance(request, str):
            error = BatchError("invalid_request", f"not a batch request line: {request}")
            return Answered(custom_id, output_line(custom_id, None, error), False)
        request_id = f"req_{uuid.uuid4().hex}"
        if request.body.get("stream"):
            refused = p.RequestError("stream is not available in a batch; results are written whole", param="stream")
            response = BatchResponse(refused.status, request_id, msgspec.Raw(p.error_body(refused)))
        else:
            answer = await self.server.respond(ENDPOINTS[request.url], msgspec.json.encode(request.body))
            response = BatchResponse(answer.status_code, request_id, msgspec.Raw(answer.body))
        return Answered(custom_id, output_line(custom_id, response), response.status_code == 200)

    async def answer_all(self, lines: list[str]) -> list[Answered]:
        return list(await asyncio.gather(*(self.answer(line) for line in lines)))


def output_line(custom_id: str | None, response: BatchResponse | None, error: BatchError | None = None) -> bytes:
    return msgspec.json.encode(BatchOutput(f"batch_req_{uuid.uuid4().hex}", custom_id, response, error))


def default_lengths(folder: Path) -> dict[str, int]:
    """The server's defaults for a model: its task's lengths, else 128 in blocks of 32 (as `dengine serve`)."""
    from dengine.tasks import generation_lengths, task_of_folder

    gen_length, block_length = generation_lengths(task_of_folder(folder))
    return {"gen_length": gen_length, "block_length": block_length}


class OpenAIBatchProcessor:
    """A Ray Data stage: `ds.map_batches(OpenAIBatchProcessor, fn_constructor_kwargs={"model": ...},
    concurrency=N)` over rows whose `text` is a batch input line (as `ray.data.read_text` gives them) returns rows
    with `custom_id`, `output` (the OpenAI batch output line), `ok` (answered with status 200) and `node`. One engine per actor, built once."""

    def __init__(self, model: str | None = None, engine_kwargs: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None, model_name: str | None = None,
                 num_threads: int | None = None) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        # the engine's loop runs for the actor's whole life on a thread of its own; batches are handed to it
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="dengine-batch-loop", daemon=True).start()
        self.answerer = self._run(_build(model, engine_kwargs, defaults, model_name))
        self.node = _node_id()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        answers = self._run(self.answerer.answer_all([str(line) for line in batch["text"]]))
        return {"custom_id": [a.custom_id for a in answers], "output": [a.output.decode() for a in answers],
                "ok": [a.ok for a in answers], "node": [self.node] * len(answers)}


async def _build(model, engine_kwargs, defaults, model_name) -> BatchAnswerer:
    return BatchAnswerer(model, engine_kwargs, defaults, model_name)  # inside a loop: the async engine binds to it


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


class ResultWriter:
    """Appends output lines to the results file as they come (flushed), each custom_id once, with a progress bar
    of rows done, rows/s and errors."""

    def __init__(self, path: Path, total: int, done: set[str], use_tqdm: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("ab")
        self.done = done
        self.errors = self.written = 0
        self.first_at: float | None = None  # when the first row was written (perf_counter)
        self.bar = tqdm(total=total, initial=len(done), desc="run-batch", unit="row", disable=not use_tqdm,
                        dynamic_ncols=True)

    def write(self, answered: Answered) -> None:
        if answered.custom_id is not None:
            if answered.custom_id in self.done:  # a retried batch's row that was already written
                return
            self.done.add(answered.custom_id)
        self.file.write(answered.output + b"\n")
        self.file.flush()
        self.errors += not answered.ok
        self.written += 1
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.bar.update(1)
        self.bar.set_postfix(errors=self.errors, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def pending_lines(path: Path, done: set[str]) -> Iterator[str]:
    return (line for line in request_lines(path) if custom_id_of(line) not in done)


async def run_local(answerer: BatchAnswerer, lines: Iterable[str], writer: ResultWriter,
                    in_flight: int = IN_FLIGHT) -> None:
    """Every line through one engine, at most in_flight at once, each result written when it finishes."""
    queue = iter(lines)

    async def worker() -> None:
        for line in queue:
            writer.write(await answerer.answer(line))

    await asyncio.gather(*(worker() for _ in range(in_flight)))


def run_ray(input_path: Path, done: set[str], writer: ResultWriter, model: str | None, replicas: int,
            engine_kwargs: dict[str, Any], defaults: dict[str, Any] | None, model_name: str | None,
            num_cpus: float, num_gpus: float, batch_size: int, ray_address: str | None) -> dict[str, int]:
    """Rows written per node (the ids of the nodes whose engines answered them)."""
    """The lines through Ray Data: streaming read, N engine actors, results streamed back and written here."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # this process draws its own bar, of rows written
    context.print_on_execution_start = False
    # reading and filtering lines is light: they take no CPU of the replicas' budget (on a small machine the
    # replicas hold every CPU, and a read waiting for one would never run)
    ds = ray.data.read_text(str(input_path), num_cpus=0)
    with warnings.catch_warnings():  # Ray prefers expressions to functions; a line's custom_id needs a function
        warnings.simplefilter("ignore", UserWarning)
        ds = ds.filter(lambda row: bool(row["text"].strip()) and custom_id_of(row["text"]) not in done, num_cpus=0)
    threads = max(1, int(num_cpus)) if num_gpus == 0 else None
    # one engine actor per replica, spread over the nodes; Ray Data restarts a dead actor and retries its rows
    with warnings.catch_warnings():  # Ray 2.60 deprecates passing scheduling options this way, with no successor yet
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(OpenAIBatchProcessor, batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=num_cpus, num_gpus=num_gpus,
                            scheduling_strategy="SPREAD",
                            fn_constructor_kwargs={"model": model, "engine_kwargs": engine_kwargs, "defaults": defaults,
                                                   "model_name": model_name, "num_threads": threads})
    nodes: Counter[str] = Counter()
    for row in ds.iter_rows():
        writer.write(Answered(row["custom_id"], row["output"].encode(), bool(row["ok"])))
        nodes[row["node"]] += 1
    return dict(nodes)


def run_batch(input_path: Path, output_path: Path, model: str | None = None, replicas: int = 1,
              engine_kwargs: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
              model_name: str | None = None, ray_address: str | None = None,
              num_cpus: float | None = None, num_gpus: float | None = None, batch_size: int = 16,
              use_tqdm: bool = True) -> dict[str, Any]:
    """Run a batch file to completion (resuming a partial output); returns counts and timings."""
    total = check_unique_ids(input_path)
    done = answered_ids(output_path)
    already = len(done)
    writer = ResultWriter(output_path, total, done, use_tqdm)
    start = time.perf_counter()
    nodes: dict[str, int] = {}
    try:
        if replicas == 1 and ray_address is None:
            async def local() -> None:
                answerer = BatchAnswerer(model, engine_kwargs, defaults, model_name)
                await run_local(answerer, pending_lines(input_path, done), writer)

            asyncio.run(local())
        else:
            cpus = num_cpus if num_cpus is not None else max(1.0, (os.cpu_count() or 1) / replicas)
            gpus = num_gpus if num_gpus is not None else (1.0 if _cuda() else 0.0)
            nodes = run_ray(input_path, done, writer, model, replicas, engine_kwargs or {}, defaults, model_name,
                            cpus, gpus, batch_size, ray_address)
    finally:
        writer.close()
    end = time.perf_counter()
    wall = end - start
    first = None if writer.first_at is None else writer.first_at - start
    steady = writer.written - 1 if first is not None and end > writer.first_at else 0
    return {"rows": total, "skipped": already, "written": writer.written, "errors": writer.errors, "seconds": wall,
            "rows_per_s": writer.written / wall if wall > 0 else 0.0, "first_row_s": first,
            "rows_per_s_after_first": steady / (end - writer.first_at) if steady else None, "rows_per_node": nodes}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
