"""The ingress of the Serve application: every HTTP request passes through one router replica, which hands it
to an engine replica and makes sure the client loses nothing when that replica dies.

* A request decodes deterministically given its seed, so the router gives every request one (a random one
  when the client sent none) before the first attempt; a retry on another replica then reproduces it.
* A non-streamed request that fails because its replica died (or could not be reached) is sent again, to
  a healthy replica, until `retry_timeout_s` has passed.
* A broken stream is resumed: the request is replayed on another replica, the events the client already
  has are checked against the replay (byte for byte, the per-request timings of a final event aside; the
  router fixes the response id and creation time for that) and skipped, and the stream goes on. A replay
  that departs from what was sent (a model without batch invariance, say) ends the stream with an error
  event in OpenAI's shape and `[DONE]`, never a silent cut. A router's own death is covered one level up, in
  Serve's proxy (dengine/serve/proxy.py), the same way: it asks the next router, through RESUME_HEADER, to
  answer with the dead one's response id and creation time.
* Draining (`drain`, which `dengine serve` calls on SIGTERM / Ctrl-C): new requests get 503 in OpenAI's
  shape, requests in flight go on, and `drain` returns when they are done or the grace period is over.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import Headers

from dengine.serve import protocol as p
from dengine.serve.proxy import RESUME_HEADER, same_event, with_seed
from dengine.serve.server import openai_app

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


class Head(msgspec.Struct, frozen=True):
    """The first item of an engine replica's answer: what the HTTP response starts with."""

    status: int
    media_type: str
    headers: dict[str, str]


# call(endpoint, body, response_id, created): the engine's answer, a Head then the body's parts (one
# server-sent event per part when streaming)
EngineCall = Callable[[str, bytes, str, int], AsyncIterator[Any]]


class Relay:
    """Sends requests to engine replicas through `call`, retrying and resuming on the `retryable` errors."""

    def __init__(self, call: EngineCall, retryable: tuple[type[BaseException], ...], retry_timeout_s: float = 60.0,
                 seed: int | None = None, headers: dict[str, str] | None = None) -> None:
        self.call = call
        self.headers = headers or {}  # added to every answer (the router's name)
        self.retryable = retryable
        self.retry_timeout_s = retry_timeout_s
        self.rng = random.Random(seed)
        self.in_flight = 0
        self.draining = False
        self.retries = 0
        self.resumed_streams = 0
        self.cut = asyncio.Event()  # set when the grace period of a shutdown is over

    def cut_off(self) -> None:
        """End every request still in flight: a stream gets an error event then [DONE], a whole answer a 503
        (both `shutting_down`, retryable by the client), and its engine work is cancelled."""
        self.cut.set()

    async def _next_or_end(self, parts) -> Any:
        try:
            return await self._next(parts)
        except StopAsyncIteration:
            return END

    async def _next(self, parts) -> Any:
        """The engine answer's next part, or CUT once cut_off was called (StopAsyncIteration at its end)."""
        return await next_unless(parts, self.cut)

    async def forward(self, endpoint: str, body: bytes, resume: str | None = None) -> Response:
        """The response to one POST, whatever happens to the replica serving it; `resume` ("<response id>
        <created>", from Serve's proxy resuming a stream whose router died) fixes the response's id and time."""
        if self.draining:
            return p.error_response(p.unavailable("the server is shutting down; send the request again later",
                                                  "shutting_down"))
        body, stream = with_seed(body, self.rng)
        response_id, created = resumed(resume) or (p.response_id(endpoint), p.now())
        self.in_flight += 1
        handed_on = False
        try:
            deadline = time.monotonic() + self.retry_timeout_s
            parts = self.call(endpoint, body, response_id, created)
            head = await self._head(parts, lambda: self.call(endpoint, body, response_id, created), deadline)
            if head is None:
                return _unavailable()
            parts, head = head
            head = Head(head.status, head.media_type, {**head.headers, **self.headers})
            if not stream or head.status != 200:
                return await self._whole(parts, head, lambda: self.call(endpoint, body, response_id, created),
                                         deadline)
            handed_on = True
            return StreamingResponse(self._events(parts, lambda: self.call(endpoint, body, response_id, created)),
                                     media_type=head.media_type,
                                     headers={**head.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finally:
            if not handed_on:
                self.in_flight -= 1

    async def _head(self, parts, again: Callable[[], AsyncIterator[Any]], deadline: float):
        """(parts, Head) of the first replica that answers, trying again on retryable errors; None at deadline."""
        pause = 0.1
        while True:
            try:
                return parts, await anext(parts)
            except self.retryable as exc:
                await _close(parts)
                if time.monotonic() + pause > deadline:
                    logger.warning("no replica answered: %r", exc)
                    return None
                self.retries += 1
                logger.info("replica failed before answering (%r); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)
                parts = again()

    async def _whole(self, parts, head: Head, again, deadline: float) -> Response:
        """A non-streamed answer, replayed from the start on another replica if its replica dies midway."""
        while True:
            try:
                chunks = []
                while (part := await self._next_or_end(parts)) is not END:
                    if part is CUT:
                        return p.error_response(shut_down())
                    chunks.append(part)
                return Response(b"".join(chunks), status_code=head.status, media_type=head.media_type,
                                headers=head.headers)
            except self.retryable as exc:
                await _close(parts)
                logger.info("replica failed midway (%r); retrying", exc)
                answered = await self._head(again(), again, deadline)
                if answered is None:
                    return _unavailable()
                parts, head = answered

    async def _events(self, parts, again) -> AsyncIterator[bytes]:
        """The stream's events; on a replica's death, a replay on another replica picks up where it broke."""
        sent: list[bytes] = []
        try:
            while True:
                try:
                    while (event := await self._next_or_end(parts)) is not END:
                        if event is CUT:
                            yield p.error_event(shut_down())
                            yield DONE
                            return
                        sent.append(event)
                        yield event
                    return
                except self.retryable as exc:
                    await _close(parts)
                    if sent and sent[-1] == DONE:
                        return
                    logger.info("stream broke after %d events (%r); resuming on another replica", len(sent), exc)
                    parts, error = await self._replay(again, sent, time.monotonic() + self.retry_timeout_s)
                    if error is not None:
                        yield p.error_event(error)
                        yield DONE
                        return
                    self.resumed_streams += 1
                except Exception as exc:  # not a dead replica: the stream cannot go on, and says so
                    logger.exception("stream failed")
                    yield p.error_event(p.RequestError(f"internal error: {exc}", status=500, kind="server_error"))
                    yield DONE
                    return
        finally:
            self.in_flight -= 1
            await _close(parts)

    async def _replay(self, again, sent: list[bytes], deadline: float):
        """A fresh run of the request, its first len(sent) events checked against `sent` and consumed."""
        answered = await self._head(again(), again, deadline)
        if answered is None:
            return None, p.RequestError("the stream broke and no replica could resume it", status=503,
                                        kind="server_error", code="resume_failed")
        parts, head = answered
        if head.status != 200:
            await _close(parts)
            return None, p.RequestError(f"the stream broke and its replay was refused ({head.status})", status=502,
                                        kind="server_error", code="resume_failed")
        for index, event in enumerate(sent):
            try:
                replayed = await anext(parts)
            except StopAsyncIteration:
                replayed = b""
            except self.retryable:
                await _close(parts)
                return await self._replay(again, sent, deadline)
            if not same_event(event, replayed):
                await _close(parts)
                return None, p.RequestError(
                    f"the stream broke and its replay on another replica departs from what was sent at event "
                    f"{index}; the request cannot be resumed", status=502, kind="server_error", code="resume_failed")
        return parts, None


async def next_unless(parts, stop: asyncio.Event) -> Any:
    """The next item of an async iterator, or CUT once `stop` is set (StopAsyncIteration at its end)."""
    return await first_unless(anext(parts), stop)


async def first_unless(awaitable, stop: asyncio.Event) -> Any:
    """What `awaitable` returns, or CUT (the awaitable cancelled) once `stop` is set."""
    if stop.is_set():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        return CUT
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        stopped.cancel()
        raise
    if work in done:
        stopped.cancel()
        return work.result()
    work.cancel()
    await asyncio.wait({work})  # let it unwind: an async generator it was advancing can then be closed
    return CUT


async def _close(parts) -> None:
    """Stop an engine answer the relay no longer reads (cancels the request on its replica)."""
    if parts is None:
        return
    cancel = getattr(parts, "cancel", None)
    if cancel is not None:
        cancel()
    else:
        await parts.aclose()


class Sentinel(enum.Enum):
    """What Relay._next_or_end and next_unless return instead of a part: CUT (a shutdown's end, a dead router),
    END (the answer's end). Enum members keep their identity when Serve pickles a deployment class by value (the
    module's name for it is the Deployment, so cloudpickle copies the class and its globals): `object()`
    sentinels would not, and `is CUT` would never hold in a replica."""

    CUT = "cut"
    END = "end"


CUT, END = Sentinel.CUT, Sentinel.END


def shut_down() -> p.RequestError:
    return p.unavailable("the server stopped before this request finished (its grace period ended); send it "
                         "again", "shutting_down")


def resumed(header: str | None) -> tuple[str, int] | None:
    """The response id and creation time RESUME_HEADER asks for (None when absent or not of that form)."""
    response_id, _, created = (header or "").partition(" ")
    if not (response_id.isascii() and response_id.replace("-", "").isalnum() and created.isdigit()):
        return None
    return response_id, int(created)


def _unavailable() -> Response:
    return p.error_response(p.unavailable("no engine replica could take the request", "replica_unavailable"))


def router_app(relay: Relay, get: Callable[[str], Any], model_name: str, max_body_bytes: int) -> FastAPI:
    """The HTTP face of the application: POSTs through the relay, GETs answered by one engine replica."""

    async def post(endpoint: str, body: bytes, headers: Headers) -> Response:
        try:
            return await relay.forward(endpoint, body, headers.get(RESUME_HEADER))
        except Exception as exc:  # not a dead replica (those are retried): the request fails in OpenAI's shape
            logger.exception("request failed")
            return p.error_response(p.RequestError(f"internal error: {exc}", status=500, kind="server_error"))

    async def answer(what: str) -> Response:
        """/v1/models here; /health and /metrics from the engine replica the call lands on (named in its
        header and labels); /health is 503 while draining."""
        if what == "models":
            return Response(msgspec.json.encode(p.ModelList([p.ModelCard(model_name)])), media_type="application/json")
        if what == "health" and relay.draining:
            return p.error_response(p.unavailable("the server is shutting down", "shutting_down"))
        return await get(what)

    return openai_app(post, answer, max_body_bytes)
