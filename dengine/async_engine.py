"""AsyncLLMEngine: LLMEngine.step() in a background loop, one async stream of outputs per request.

Streaming for a diffusion model: semi-autoregressive decoding makes blocks final left to right, so a
request's stream yields each block's text as soon as that block has no mask left, then one final chunk
carrying the rest of the text and the request's metrics. The concatenated `text` of the chunks is the
final text. Leaving the stream early (client disconnect, task cancellation, `break`) aborts the request
and frees its KV blocks.

Only the loop touches the engine's mutable state: requests are validated when they arrive (bad input
raises at once, nothing queued; `add_request_async` tokenizes and validates in a worker thread) and handed
to the loop, which adds and aborts them between steps and runs each step on the engine's own step thread
(always the same one) so the event loop stays responsive. The thread that built the engine gives back its
OpenMP workers (`release_openmp_threads`), so only the step thread's team is left spinning between parallel
regions. `on_stats`, when set, sees a fresh EngineStats after aborts, at least every
STATS_INTERVAL_S while stepping, whenever the engine goes idle and every IDLE_STATS_S while it stays idle (Ray's
metrics export drops a gauge not set within twice its report interval), so gauges built on it never go stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from dengine.engine import LLMEngine, PromptType, release_openmp_threads
from dengine.outputs import RequestOutput, TokenLogprob
from dengine.sampling_params import SamplingParams
from dengine.scheduler.sequence import Sequence

logger = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.5
IDLE_STATS_S = 5.0  # while idle; Ray's metrics report interval is 10 s


class StreamChunk(msgspec.Struct, kw_only=True):
    """One piece of a request's stream: new final text (and its tokens); `output` only on the last chunk."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked for them
    finished: bool = False
    output: RequestOutput | None = None


class EngineStats(msgspec.Struct, kw_only=True):
    """A snapshot of the engine for health checks and metrics."""

    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int
    generated_tokens: int
    full_recomputes: int
    finished_requests: int
    aborted_requests: int = 0  # ended before finishing: client gone, router dead, cut off at a shutdown


class _Stream:
    """Per-request state: the queue the loop fills, and what has been sent so far."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
        self.sent_tokens = 0
        self.sent_text = ""
        self.done = False


class AsyncLLMEngine:
    """Wraps an LLMEngine; `generate` is an async iterator of StreamChunks, `abort` cancels a request."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._pending: list[_Stream] = []
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._steps = self._tokens = self._recomputes = self._finished = self._aborted = 0
        self.on_stats: Callable[[EngineStats], None] | None = None
        self._stats_time = 0.0
        self._stats_changed = False
        # Every step on one thread: each thread running torch ops keeps its own OpenMP team.
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dengine-step")
        release_openmp_threads()  # this thread's team (if it ran torch work since) would make the step thread's sleep

    @classmethod
    def from_model(cls, model: Any = None, **engine_kwargs: Any) -> AsyncLLMEngine:
        from dengine.assets import resolve_model

        return cls(LLMEngine(resolve_model(model), **engine_kwargs))

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request, returning its id; raises ValueError (nothing queued) for bad input."""
        request_id = self._free_id(request_id)
        return self._queue(self.engine.make_sequence(request_id, prompt, params))

    async def add_request_async(self, prompt: PromptType, params: SamplingParams | None = None,
                                request_id: str | None = None) -> str:
        """add_request with tokenization and validation in a worker thread: a long prompt stalls no stream."""
        request_id = self._free_id(request_id)
        return self._queue(await asyncio.to_thread(self.engine.make_sequence, request_id, prompt, params))

    def _free_id(self, request_id: str | None) -> str:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def _queue(self, seq: Sequence) -> str:
        self._free_id(seq.request_id)  # another request may have taken the id while this one was tokenized
        stream = _Stream(seq)
        self._streams[seq.request_id] = stream
        self._pending.append(stream)
        self._ensure_loop()
        return seq.request_id

    def stream(self, request_id: str) -> AsyncIterator[StreamChunk]:
        """The chunks of a queued request; leaving early (break, cancel, disconnect) aborts it.

        The request is looked up now, not at the first chunk: a request that finishes before its iterator is
        first awaited (the second of n answers, read after the first's chunk) still yields its chunks."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        return self._chunks(request_id, stream)

    async def _chunks(self, request_id: str, stream: _Stream) -> AsyncIterator[StreamChunk]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.done:
                self.abort(request_id)

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """add_request then stream, as one async iterator."""
        async for chunk in self.stream(self.add_request(prompt, params, request_id)):
            yield chunk

    async def generate_full(self, prompt: PromptType, params: SamplingParams | None = None,
                            request_id: str | None = None) -> RequestOutput:
        """Run one request to the end and return its RequestOutput."""
        async for chunk in self.generate(prompt, params, request_id):
            if chunk.output is not None:
                return chunk.output
        raise RuntimeError("the stream ended without a final output")  # generate always ends with one

    def abort(self, request_id: str) -> None:
        """Cancel a request (a no-op for unknown or finished ones); its blocks are freed before the next step."""
        stream = self._streams.pop(request_id, None)
        if stream is None or stream.done:
            return
        stream.done = True
        self._aborted += 1
        if stream in self._pending:
            self._pending.remove(stream)
        else:
            self._aborts.append(request_id)
        self._stats_changed = True
        self._wake()

    def stats(self) -> EngineStats:
        manager = self.engine.kv_manager
        return EngineStats(
            waiting=len(self.engine.scheduler.waiting) + len(self._pending),
            running=len(self.engine.scheduler.running),
            kv_blocks_used=manager.pool.num_blocks - manager.num_free_blocks,
            kv_blocks_total=manager.pool.num_blocks,
            steps=self._steps,
            generated_tokens=self._tokens,
            full_recomputes=self._recomputes,
            finished_requests=self._finished,
            aborted_requests=self._aborted,
        )

    @property
    def loop_error(self) -> BaseException | None:
        """The exception that ended the background loop, if it died."""
        task = self._loop_task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # -- the loop ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._run())
        self._wake()

    def _publish_stats(self, force: bool) -> None:
        if self.on_stats is None or not (force or time.monotonic() - self._stats_time >= STATS_INTERVAL_S):
            return
        self._stats_time, self._stats_changed = time.monotonic(), False
        try:
            self.on_stats(self.stats())
        except Exception:  # metrics must never stop the engine
            logger.exception("on_stats failed")

    async def _run(self) -> None:
        engine = self.engine
        while True:
            for request_id in self._aborts:
                engine.abort_request(request_id)
            self._aborts.clear()
            for stream in self._pending:
                engine.add_sequence(stream.seq)
            self._pending.clear()
            self._publish_stats(force=self._stats_changed)
            if not engine.has_unfinished_requests():
                self._publish_stats(force=True)
                self._wakeup.clear()
                try:  # idle: stats are republished every IDLE_STATS_S, or an exporter drops the gauges
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_STATS_S)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                finished = await asyncio.get_running_loop().run_in_executor(self._step_thread, engine.step)
            except Exception as exc:  # fail what was in flight, keep serving the next requests
                logger.exception("engine step failed")
                self._fail_all(RuntimeError(f"engine step failed: {exc}"))
                continue
            self._after_step(finished)
            await asyncio.sleep(0)  # let handlers run (new requests, aborts) between steps

    def _after_step(self, finished: list[RequestOutput]) -> None:
        self._steps += 1
        done = {output.request_id: output for output in finished}
        for request_id, stream in list(self._streams.items()):
            seq = stream.seq
            if stream.done or seq.metrics.steps == 0:
                continue
            output = done.get(request_id)
            if output is not None:
                self._finish(stream, output)
            elif seq.block_start - seq.prompt_len > stream.sent_tokens:  # a block was completed this step
                stream.queue.put_nowait(self._delta(stream, seq.final_token_ids(), final=False))

    def _delta(self, stream: _Stream, token_ids: list[int], final: bool) -> StreamChunk:
        """The chunk for tokens newly final; text is what their decoding adds (a split character waits)."""
        text = self.engine.decode_text(token_ids) or ""
        if not final:
            text = text.rstrip("\ufffd")
        new_text = text[len(stream.sent_text):] if text.startswith(stream.sent_text) else text
        logprobs = stream.seq.logprobs
        chunk = StreamChunk(request_id=stream.seq.request_id, text=new_text,
                            token_ids=token_ids[stream.sent_tokens:], prompt_tokens=stream.seq.prompt_len,
                            logprobs=None if logprobs is None else logprobs[stream.sent_tokens : len(token_ids)])
        stream.sent_tokens, stream.sent_text = len(token_ids), stream.sent_text + new_text
        return chunk

    def _finish(self, stream: _Stream, output: RequestOutput) -> None:
        chunk = self._delta(stream, output.token_ids, final=True)
        chunk.finished, chunk.output = True, output
        stream.done = True
        self._streams.pop(output.request_id, None)
        self._finished += 1
        self._tokens += len(output.token_ids)
        self._recomputes += output.metrics.full_recomputes
        stream.queue.put_nowait(chunk)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            if stream in self._pending:
                continue
            self.engine.abort_request(request_id)
            stream.done = True
            self._streams.pop(request_id, None)
            stream.queue.put_nowait(error)

