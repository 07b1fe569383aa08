"""The OpenAI-compatible HTTP API over an AsyncLLMEngine, as a FastAPI app (Ray Serve hosts it per replica).

    POST /v1/completions        text or token-id prompt; `stream: true` gives server-sent events
    POST /v1/chat/completions   chat messages through the model's chat template; streams the same way
    GET  /v1/models             the served model
    GET  /health                200 with the engine's queue and KV state
    GET  /metrics               Prometheus text format (this replica)
    GET  /explore               the denoising trace explorer (dengine.explore), running prompts here

A stream sends one event per decoded block (semi-AR blocks are final left to right), then one with the
finish reason (and usage when `stream_options.include_usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import Response, StreamingResponse

from dengine.async_engine import AsyncLLMEngine, StreamChunk
from dengine.explore import add_explore_route
from dengine.sampling_params import SamplingParams
from dengine.serve import protocol as p
from dengine.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)
JSON = "application/json"


class OpenAIServer:
    """Request handling shared by every route: decode strictly, validate, queue, answer."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, defaults: SamplingParams | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.defaults = defaults or SamplingParams(gen_length=128, block_length=32)
        config = engine.engine.config
        self.stop_ids = {config.eos_token_id, engine.engine.eot_token_id}
        self.metrics = ServerMetrics(model_name)

    # -- validation -------------------------------------------------------------------------------

    def _check_model(self, request: p.DiffusionFields) -> None:
        if request.model is not None and request.model != self.model_name:
            raise p.RequestError(f"model {request.model!r} is not served here; this server has {self.model_name!r}",
                                 status=404, param="model", code="model_not_found")

    def _chat_prompt(self, request: p.ChatCompletionRequest) -> dict[str, list[int]]:
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None or tokenizer.chat_template is None:
            raise p.RequestError("this model has no chat template; use /v1/completions")
        if not request.messages:
            raise p.RequestError("messages must not be empty", param="messages")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def _queue(self, request: p.DiffusionFields, prompt) -> str:
        self._check_model(request)
        params = request.sampling_params(self.defaults)
        try:
            return self.engine.add_request(prompt, params)
        except ValueError as exc:  # bad prompt, options the family lacks, unknown cache options, too large
            raise p.RequestError(str(exc)) from None

    # -- endpoints --------------------------------------------------------------------------------

    async def completions(self, body: bytes) -> Response:
        request = p.decode_request(body, p.CompletionRequest)
        prompt = request.prompt if isinstance(request.prompt, str) else {"prompt_token_ids": request.prompt}
        request_id = self._queue(request, prompt)
        response_id, created = p.new_id("cmpl"), p.now()
        if request.stream:
            return self._sse(self._completion_events(request, request_id, response_id, created))
        output = await self._final(request_id)
        response = p.CompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[p.CompletionChoice(0, output.text or "", p.finish_reason(output, self.stop_ids))],
            usage=p.usage(output, self.stop_ids), dengine=output.metrics, trace=output.trace,
        )
        return Response(msgspec.json.encode(response), media_type=JSON)

    async def chat_completions(self, body: bytes) -> Response:
        request = p.decode_request(body, p.ChatCompletionRequest)
        request_id = self._queue(request, self._chat_prompt(request))
        response_id, created = p.new_id("chatcmpl"), p.now()
        if request.stream:
            return self._sse(self._chat_events(request, request_id, response_id, created))
        output = await self._final(request_id)
        response = p.ChatCompletionResponse(
            id=response_id, created=created, model=self.model_name,
            choices=[p.ChatChoice(0, p.ChatMessageOut("assistant", output.text or ""),
                                  p.finish_reason(output, self.stop_ids))],
            usage=p.usage(output, self.stop_ids), dengine=output.metrics, trace=output.trace,
        )
        return Response(msgspec.json.encode(response), media_type=JSON)

    def models(self) -> Response:
        return Response(msgspec.json.encode(p.ModelList([p.ModelCard(self.model_name)])), media_type=JSON)

    def health(self) -> Response:
        stats = self.engine.stats()
        self.metrics.observe(stats)
        return Response(msgspec.json.encode({"status": "ok", "model": self.model_name, "engine": stats}),
                        media_type=JSON)

    def render_metrics(self) -> Response:
        self.metrics.observe(self.engine.stats())
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- results ----------------------------------------------------------------------------------

    async def _final(self, request_id: str):
        async for chunk in self.engine.stream(request_id):
            if chunk.output is not None:
                self._record(chunk)
                return chunk.output
        raise RuntimeError("stream ended without a final output")

    def _record(self, chunk: StreamChunk) -> None:
        self.metrics.finished(len(chunk.output.token_ids), chunk.output.metrics.nfe)
        self.metrics.observe(self.engine.stats())

    async def _completion_events(self, request, request_id, response_id, created) -> AsyncIterator[bytes]:
        async for chunk in self.engine.stream(request_id):
            reason = None
            if chunk.output is not None:
                self._record(chunk)
                reason = p.finish_reason(chunk.output, self.stop_ids)
            if chunk.text or reason:
                yield _event(p.CompletionResponse(
                    id=response_id, created=created, model=self.model_name,
                    choices=[p.CompletionChoice(0, chunk.text, reason)],
                    dengine=chunk.output.metrics if chunk.output else None,
                ))
            if chunk.output is not None and request.stream_options and request.stream_options.include_usage:
                yield _event(p.CompletionResponse(id=response_id, created=created, model=self.model_name,
                                                  choices=[], usage=p.usage(chunk.output, self.stop_ids)))
        yield b"data: [DONE]\n\n"

    async def _chat_events(self, request, request_id, response_id, created) -> AsyncIterator[bytes]:
        def event(delta: p.ChatMessageOut, reason: str | None = None, **extra) -> bytes:
            return _event(p.ChatCompletionChunk(id=response_id, created=created, model=self.model_name,
                                                choices=[p.ChatDeltaChoice(0, delta, reason)], **extra))

        yield event(p.ChatMessageOut(role="assistant", content=""))
        async for chunk in self.engine.stream(request_id):
            if chunk.text:
                yield event(p.ChatMessageOut(content=chunk.text))
            if chunk.output is not None:
                self._record(chunk)
                yield event(p.ChatMessageOut(), p.finish_reason(chunk.output, self.stop_ids),
                            dengine=chunk.output.metrics)
                if request.stream_options and request.stream_options.include_usage:
                    yield _event(p.ChatCompletionChunk(id=response_id, created=created, model=self.model_name,
                                                       choices=[], usage=p.usage(chunk.output, self.stop_ids)))
        yield b"data: [DONE]\n\n"

    def _sse(self, events: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(message: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(message) + b"\n\n"


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of one server; every refused request gets OpenAI's error shape."""
    app = FastAPI(title="dengine", docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown routes (404) and wrong methods (405) in OpenAI's error shape too."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = p.RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                               kind=kind)
        return Response(p.error_body(error), status_code=exc.status_code, media_type=JSON,
                        headers=getattr(exc, "headers", None))

    async def guarded(endpoint: str, handler, request: Request) -> Response:
        try:
            response = await handler(await request.body())
        except p.RequestError as error:
            response = Response(p.error_body(error), status_code=error.status, media_type=JSON)
        except Exception as exc:  # an engine failure: the request fails, the server keeps serving
            logger.exception("request failed")
            error = p.RequestError(f"internal error: {exc}", status=500, kind="server_error")
            response = Response(p.error_body(error), status_code=500, media_type=JSON)
        server.metrics.request(endpoint, response.status_code)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await guarded("completions", server.completions, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await guarded("chat_completions", server.chat_completions, request)

    @app.get("/v1/models")
    async def models() -> Response:
        return server.models()

    @app.get("/health")
    async def health() -> Response:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return server.render_metrics()

    add_explore_route(app)
    return app
