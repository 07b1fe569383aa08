"""The OpenAI-compatible HTTP API over an AsyncLLMEngine, as a FastAPI app (Ray Serve hosts it per replica).

    POST /v1/completions        text or token-id prompt; `stream: true` gives server-sent events
    POST /v1/chat/completions   chat messages through the model's chat template; streams the same way
    GET  /v1/models             the served model
    GET  /health                200 with the engine's queue and KV state
    GET  /metrics               Prometheus text format (this replica, labelled with its name)
    GET  /explore               the denoising trace explorer (dengine.explore), running prompts here

A stream sends one event per decoded block (semi-AR blocks are final left to right), then one with the
finish reason (and usage when `stream_options.include_usage`), then `data: [DONE]`. With n > 1 the n answers
decode side by side (n requests with consecutive seeds) and their events come in rounds: every answer's first
event by index, then every answer's second, so the order depends only on the answers.

Nothing a client sends can stall other requests: a body over `max_body_bytes` is refused before it is
read to the end, a prompt with more characters than the model's positions could hold is refused before
tokenization, and tokenization runs in a worker thread, off the event loop that feeds every stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import torch
from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import Response, StreamingResponse

from dengine.async_engine import AsyncLLMEngine, StreamChunk
from dengine.engine import PromptError
from dengine.kv.kv_cache import available_memory_bytes, total_memory_bytes
from dengine.explore import add_explore_route
from dengine.llm import chat_prompt
from dengine.sampling_params import SamplingParams
from dengine.serve import protocol as p
from dengine.serve.metrics import ServerMetrics
from dengine.serve.proxy import BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, body_timeout_response
from dengine.tasks import task_of_folder

logger = logging.getLogger(__name__)
JSON = "application/json"
# new requests are refused (503, Retry-After) while the host has less than this share of its RAM available: a
# replica that keeps admitting work there is what the kernel's OOM killer or Ray's memory monitor stops next
MEMORY_FLOOR = 0.05


class OpenAIServer:
    """Request handling shared by every route: decode strictly, validate, queue, answer."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, defaults: SamplingParams | None = None, *,
                 replica: str = "local", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 memory_floor: float = MEMORY_FLOOR) -> None:
        self.engine = engine
        self.model_name = model_name
        self.replica = replica
        self.max_body_bytes = max_body_bytes
        self.memory_floor = memory_floor
        self.defaults = defaults or SamplingParams(gen_length=128, block_length=32)
        config = engine.engine.config
        self.stop_ids = {config.eos_token_id, engine.engine.eot_token_id}
        self.token_chars = _longest_token_chars(engine.engine.tokenizer)
        self.max_prompt_chars = config.max_position_embeddings * self.token_chars
        self.metrics = ServerMetrics(model_name, replica)
        self.task = task_of_folder(engine.engine.model_path)  # an embedded model's task; None for a real model
        # what the chat template puts around one user message, rendered once: a raw prompt is on task only inside it
        tokenizer = engine.engine.tokenizer
        self.template_frame = ("", "")
        if self.task is not None and tokenizer is not None and tokenizer.chat_template is not None:
            prefix, _, suffix = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}],
                                                              add_generation_prompt=True, tokenize=False).partition("\x00")
            self.template_frame = (prefix, suffix)
        engine.on_stats = self.metrics.observe  # gauges follow the engine, aborts and idle included

    # -- validation -------------------------------------------------------------------------------

    def off_task_warning(self, question: str | None, raw: bool = False) -> str | None:
        """For an embedded model (trained on one task only, as a chat), a warning when question is not one of its
        task's: the last user message of a chat or, raw, a completion prompt, which must then be a task question
        inside the model's chat template (the form the model was trained on)."""
        task = self.task
        if task is None or question is None:
            return None
        if raw:
            prefix, suffix = self.template_frame
            inside = question.startswith(prefix) and question.endswith(suffix) and len(question) >= len(prefix + suffix)
            if inside and task.recognizes(question[len(prefix) : len(question) - len(suffix)]):
                return None
        elif task.recognizes(question):
            return None
        how = "inside the model's chat template (or use /v1/chat/completions)" if raw else "as a chat"
        return (f"{self.model_name} is an embedded model trained only on the task {task.name} ({task.summary}); "
                f"this prompt is not one of its questions, which read like {task.example!r} {how}, so the answer "
                "means nothing")

    def _check_memory(self) -> None:
        """Refuse new work (503 overloaded, Retry-After) while the host is short of memory; requests in flight go
        on, and the replica answers again once memory is back."""
        if self.memory_floor <= 0:
            return
        available, total = host_memory()
        if available < self.memory_floor * total:
            raise p.unavailable(f"the host is short of memory ({available / 1e9:.2f} of {total / 1e9:.1f} GB "
                                "available); send the request again in a few seconds", "overloaded")

    def _check_model(self, request: p.DiffusionFields) -> None:
        if request.model is not None and request.model != self.model_name:
            raise p.RequestError(f"model {request.model!r} is not served here; this server has {self.model_name!r}",
                                 status=404, param="model", code="model_not_found")

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a prompt too long for the model whatever its tokenization."""
        if chars > self.max_prompt_chars:
            raise p.RequestError(
                f"{param} has {chars} characters: more tokens than the model's "
                f"{self.engine.engine.config.max_position_embeddings} positions", param=param)

    def _chat_prompt(self, request: p.ChatCompletionRequest) -> dict[str, list[int]]:
        """The chat rendered by the model's template and tokenized (a worker thread calls this)."""
        messages = [{"role": m.template_role, "content": m.text} for m in request.messages]
        return chat_prompt(self.engine.engine.tokenizer, messages)

    async def _queue(self, request: p.DiffusionFields, prompts: list) -> list[str]:
        """Validate and queue the request's answers, n per prompt, prompt by prompt; tokenization (and the chat
        template) run in a worker thread. If one cannot be queued, none stays queued."""
        self._check_model(request)
        params = request.sampling_params(self.defaults)
        request_ids: list[str] = []
        try:
            if isinstance(request, p.ChatCompletionRequest):
                prompts = [await asyncio.to_thread(self._chat_prompt, request)]
            for k, seed in enumerate(request.choice_seeds(params.seed, len(prompts))):
                prompt = prompts[k // request.n]
                request_ids.append(await self.engine.add_request_async(prompt, params.replace(seed=seed)))
            return request_ids
        except PromptError as exc:  # empty, not the vocabulary's tokens, too long for the model
            field = "messages" if isinstance(request, p.ChatCompletionRequest) else "prompt"
            raise p.RequestError(str(exc), param=field, code=exc.code) from None
        except ValueError as exc:  # options the family lacks, unknown cache options, too large for the pool
            raise request.field_error(str(exc)) from None
        finally:
            if len(request_ids) < request.n * len(prompts):
                for request_id in request_ids:
                    self.engine.abort(request_id)

    # -- the one entry point of POSTed requests ----------------------------------------------------

    async def respond(self, endpoint: str, body: bytes, response_id: str | None = None,
                      created: int | None = None) -> Response:
        """The response to one POST (an error in OpenAI's shape if refused), counted in the metrics.

        A router replaying a request on another replica passes its own response id and creation time, so
        that both replicas' events are byte for byte the same."""
        handler = {"completions": self.completions, "chat_completions": self.chat_completions}[endpoint]
        try:
            if len(body) > self.max_body_bytes:
                raise p.body_too_large(self.max_body_bytes)
            self._check_memory()
            response = await handler(body, response_id or p.response_id(endpoint), created or p.now())
        except p.RequestError as error:
            response = p.error_response(error)
        except Exception as exc:  # an engine failure: the request fails, the server keeps serving
            logger.exception("request failed")
            response = p.error_response(p.RequestError(f"internal error: {exc}", status=500, kind="server_error"))
        self.metrics.request(endpoint, response.status_code)
        return response

    # -- endpoints --------------------------------------------------------------------------------

    async def completions(self, body: bytes, response_id: str, created: int) -> Response:
        request = p.decode_request(body, p.CompletionRequest)
        prompts = request.prompts()
        for prompt in prompts:
            if isinstance(prompt, str):
                self._check_prompt_chars(len(prompt), "prompt")
        request_ids = await self._queue(
            request, [prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt} for prompt in prompts])
        warning = next(filter(None, (self.off_task_warning(prompt, raw=True) for prompt in prompts
                                     if isinstance(prompt, str))), None)
        # answer k is the (k % n)-th of prompt k // n, as OpenAI indexes the choices of a batch of prompts
        echoes = [self._echo(request, prompts[k // request.n]) for k in range(len(request_ids))]
        if request.stream:
            return self._sse(self._completion_events(request, request_ids, echoes, response_id, created, warning))
        outputs = await self._finals(request_ids)
        answers = [self._answer(request) for _ in outputs]
        texts = [echo + answer.whole(output) for echo, answer, output in zip(echoes, answers, outputs)]
        response = p.CompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[p.CompletionChoice(i, text, answer.finish_reason(output),
                                        p.completion_logprobs(answer.logprobs(), len(echo), self._token_text))
                     for i, (text, echo, answer, output) in enumerate(zip(texts, echoes, answers, outputs))],
            usage=self._usage(request, answers, outputs), dengine=self._metrics(outputs), trace=outputs[0].trace,
            warning=warning,
        )
        return Response(msgspec.json.encode(response), media_type=JSON)

    async def chat_completions(self, body: bytes, response_id: str, created: int) -> Response:
        request = p.decode_request(body, p.ChatCompletionRequest)
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None or tokenizer.chat_template is None:
            raise p.RequestError("this model has no chat template; use /v1/completions")
        if not request.messages:
            raise p.RequestError("messages must not be empty", param="messages")
        # each message adds at least one token of the chat template's (its role marker): counted as a token's
        # worth of characters, so 140,000 empty messages are refused before the template renders them
        self._check_prompt_chars(sum(len(m.text) + self.token_chars for m in request.messages), "messages")
        request_ids = await self._queue(request, [None])
        asked = next((m.text for m in reversed(request.messages) if m.role == "user"), "")
        warning = self.off_task_warning(asked)
        if request.stream:
            return self._sse(self._chat_events(request, request_ids, response_id, created, warning))
        outputs = await self._finals(request_ids)
        answers = [self._answer(request) for _ in outputs]
        texts = [answer.whole(output) for answer, output in zip(answers, outputs)]
        response = p.ChatCompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[p.ChatChoice(i, p.ChatMessageOut("assistant", text), answer.finish_reason(output),
                                  p.chat_logprobs(answer.logprobs(), self._token_text))
                     for i, (text, answer, output) in enumerate(zip(texts, answers, outputs))],
            usage=self._usage(request, answers, outputs), dengine=self._metrics(outputs), trace=outputs[0].trace,
            warning=warning,
        )
        return Response(msgspec.json.encode(response), media_type=JSON)

    def models(self) -> Response:
        return Response(msgspec.json.encode(p.ModelList([p.ModelCard(self.model_name)])), media_type=JSON)

    def health(self) -> Response:
        stats = self.engine.stats()
        self.metrics.observe(stats)
        body = {"status": "ok", "model": self.model_name, "replica": self.replica, "engine": stats}
        return Response(msgspec.json.encode(body), media_type=JSON, headers={REPLICA_HEADER: self.replica})

    def render_metrics(self) -> Response:
        self.metrics.observe(self.engine.stats())
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4",
                        headers={REPLICA_HEADER: self.replica})

    # -- results ----------------------------------------------------------------------------------

    async def _finals(self, request_ids: list[str]) -> list:
        """The final outputs of a request's answers (leaving early aborts every one)."""
        async def final(request_id: str):
            async for chunk in self.engine.stream(request_id):
                if chunk.output is not None:
                    self._record(chunk)
                    return chunk.output
            raise RuntimeError("stream ended without a final output")

        return list(await asyncio.gather(*(final(request_id) for request_id in request_ids)))

    async def _choice_chunks(self, request_ids: list[str]) -> AsyncIterator[tuple[int, StreamChunk]]:
        """(answer index, chunk) in rounds: every answer's first chunk by index, then every second one, ...; an
        answer that has ended drops out. The order depends only on the answers (a replayed stream repeats it)."""
        streams = [self.engine.stream(request_id) for request_id in request_ids]
        live = list(range(len(streams)))
        try:
            while live:
                for index in list(live):
                    try:
                        chunk = await anext(streams[index])
                    except StopAsyncIteration:
                        live.remove(index)
                        continue
                    if chunk.output is not None:
                        self._record(chunk)
                    yield index, chunk
        finally:
            for stream in streams:  # leaving early (a client gone) aborts the answers still decoding
                await stream.aclose()
            for request_id in request_ids:  # those not read yet too (aclose runs nothing in an unstarted one)
                self.engine.abort(request_id)  # a no-op for a finished answer

    def _answer(self, request: p.DiffusionFields) -> p.Answer:
        return p.Answer(request, self.stop_ids, self.engine.engine.tokenizer)

    def _token_text(self, token_id: int) -> str:
        return self.engine.engine.token_text(token_id) or ""

    @staticmethod
    def _usage(request: p.DiffusionFields, answers: list[p.Answer], outputs: list | None = None) -> p.Usage:
        """The usage of a request's answers (so far, without outputs): each prompt counted once."""
        usages = [answer.usage_so_far() for answer in answers] if outputs is None else \
            [answer.usage(output) for answer, output in zip(answers, outputs)]
        return p.total_usage(usages, request.n)

    @staticmethod
    def _metrics(outputs: list):
        return outputs[0].metrics if len(outputs) == 1 else [output.metrics for output in outputs]

    def _echo(self, request: p.CompletionRequest, prompt: str | list[int]) -> str:
        """The prompt's text when the request asks for echo (token-id prompts decoded), else nothing."""
        if not request.echo:
            return ""
        if isinstance(prompt, str):
            return prompt
        tokenizer = self.engine.engine.tokenizer
        return "" if tokenizer is None else tokenizer.decode(prompt)

    def _record(self, chunk: StreamChunk) -> None:
        self.metrics.finished(len(chunk.output.token_ids), chunk.output.metrics.nfe)
        self.metrics.observe(self.engine.stats())

    async def _completion_events(self, request, request_ids, echoes, response_id, created,
                                 warning: str | None) -> AsyncIterator[bytes]:
        answers = [self._answer(request) for _ in request_ids]
        event = self._event_maker(request, answers, p.CompletionResponse, response_id, created)
        for index, echo in enumerate(echoes):
            if echo:
                yield event(p.CompletionChoice(index, echo, None))
        outputs = [None] * len(request_ids)
        async for index, chunk in self._choice_chunks(request_ids):
            answer, reason = answers[index], None
            text = answer.feed(chunk.text, chunk.token_ids, chunk.logprobs, chunk.prompt_tokens)
            if chunk.output is not None:
                outputs[index] = chunk.output
                text += answer.flush()
                reason = answer.finish_reason(chunk.output)
            logprobs = p.completion_logprobs(answer.logprobs(), len(echoes[index]), self._token_text)
            if text or reason or logprobs:
                final = chunk.output is not None
                yield event(p.CompletionChoice(index, text, reason, logprobs),
                            dengine=chunk.output.metrics if final else None, warning=warning if final else None)
        if request.stream_options and request.stream_options.include_usage:
            yield event(usage=self._usage(request, answers, outputs))
        yield b"data: [DONE]\n\n"

    def _event_maker(self, request, answers: list[p.Answer], kind: type, response_id: str, created: int):
        """event(*choices, **fields): one server-sent event of the stream; with `continuous_usage_stats` each
        carries the usage so far (vLLM's extension)."""
        continuous = request.stream_options is not None and request.stream_options.continuous_usage_stats

        def event(*choices, **fields) -> bytes:
            if continuous and "usage" not in fields:
                fields["usage"] = self._usage(request, answers)
            return _event(kind(id=response_id, created=created, model=self.model_name, choices=list(choices),
                               **fields))

        return event

    async def _chat_events(self, request, request_ids, response_id, created,
                           warning: str | None) -> AsyncIterator[bytes]:
        answers = [self._answer(request) for _ in request_ids]
        event = self._event_maker(request, answers, p.ChatCompletionChunk, response_id, created)
        for index in range(len(request_ids)):
            yield event(p.ChatDeltaChoice(index, p.ChatMessageOut(role="assistant", content=""), None))
        outputs = [None] * len(request_ids)
        async for index, chunk in self._choice_chunks(request_ids):
            answer = answers[index]
            text = answer.feed(chunk.text, chunk.token_ids, chunk.logprobs, chunk.prompt_tokens)
            text += answer.flush() if chunk.output is not None else ""
            logprobs = p.chat_logprobs(answer.logprobs(), self._token_text)
            if text or logprobs:
                yield event(p.ChatDeltaChoice(index, p.ChatMessageOut(content=text), None, logprobs))
            if chunk.output is not None:
                outputs[index] = chunk.output
                yield event(p.ChatDeltaChoice(index, p.ChatMessageOut(), answer.finish_reason(chunk.output)),
                            dengine=chunk.output.metrics, warning=warning)
        if request.stream_options and request.stream_options.include_usage:
            yield event(usage=self._usage(request, answers, outputs))
        yield b"data: [DONE]\n\n"

    def _sse(self, events: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


REPLICA_HEADER = "X-Dengine-Replica"


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of the host's RAM."""
    cpu = torch.device("cpu")
    return available_memory_bytes(cpu), total_memory_bytes(cpu)


def _event(message: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(message) + b"\n\n"


def _longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (its vocabulary string bounds its decoded text); a
    prompt of C characters has at least C / this many tokens. 1 without a tokenizer (no text prompts)."""
    if tokenizer is None:
        return 1
    return max(len(piece) for piece in tokenizer.get_vocab())


def install_error_handlers(app: FastAPI) -> None:
    """Unknown routes (404) and wrong methods (405) answer in OpenAI's error shape too."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = p.RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                               kind=kind)
        return p.error_response(error, headers=getattr(exc, "headers", None))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit`, before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise p.body_too_large(limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise p.body_too_large(limit)
        parts.append(part)
    return b"".join(parts)


def openai_app(post: Callable[[str, bytes, Headers], Awaitable[Response]], get: Callable[[str], Awaitable[Response]],
               max_body_bytes: int, refused: Callable[[str, int], None] | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The routes of every dengine HTTP face: POSTs (body read within max_body_bytes and body_timeout_s) to
    `post(endpoint, body, headers)`, GETs to `get("models" | "health" | "metrics")`; every refusal in OpenAI's error
    shape. A client that stops sending its body holds a request slot only body_timeout_s (then 408); one that
    disconnects is dropped without a traceback."""
    app = FastAPI(title="dengine", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    async def read_and_post(endpoint: str, request: Request) -> Response:
        try:
            body = await asyncio.wait_for(read_body(request, max_body_bytes), body_timeout_s)
        except asyncio.TimeoutError:
            if refused is not None:
                refused(endpoint, 408)
            return body_timeout_response(body_timeout_s)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer
            return Response(status_code=499)
        except p.RequestError as error:
            if refused is not None:
                refused(endpoint, error.status)
            return p.error_response(error)
        return await post(endpoint, body, request.headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await read_and_post("completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await read_and_post("chat_completions", request)

    @app.get("/v1/models")
    async def models() -> Response:
        return await get("models")

    @app.get("/health")
    async def health() -> Response:
        return await get("health")

    @app.get("/metrics")
    async def metrics() -> Response:
        return await get("metrics")

    add_explore_route(app)
    return app


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of one server (in process, no router)."""
    async def get(what: str) -> Response:
        return {"models": server.models, "health": server.health, "metrics": server.render_metrics}[what]()

    async def post(endpoint: str, body: bytes, headers: Headers) -> Response:
        return await server.respond(endpoint, body)

    return openai_app(post, get, server.max_body_bytes, server.metrics.request)
