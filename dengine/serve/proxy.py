"""What dengine runs inside Ray Serve's HTTP proxy: a request goes on to a router only once its whole body is in.

Serve's proxy hands a request to a router replica as soon as its headers arrive; the router then pulls the
body from the proxy, message by message, over Ray calls. A client that sends half a body and stops holds one
of the router's request slots and a chain of Ray calls until the router's body timeout: 10,000 such clients
took every slot and raised the other clients' p99 from 3 s to 17 s (docs/benchmarks.md 6b). `WholeBodies` reads a
POST's body in the proxy first, within the same timeout and up to the default body limit: a half-sent body
costs a waiting coroutine in the proxy and ends with a 408 from there; a whole one is replayed to Serve
untouched. A body declared or found larger than the limit is passed on as it streams (the router applies its
own limit, which `build_app(max_body_bytes=)` may set higher, and its own body timeout).

Having the whole body, it can also send a request again when the router replica it went to dies (killed,
its node lost, Ray's memory monitor): Serve's proxy then returns without an answer, or with a stream cut
short. A request to dengine's POST routes (ANSWER_PATHS; other applications' POSTs go on once) not answered
yet is sent again, to a router Serve still has, for up to `router_retry_s` after each death (past that, a 503
with Retry-After). A stream is resumed the way the routers resume one whose engine died:
its seed is fixed here before the first try (`with_seed`), a later try asks the new router for the same
response id and creation time (RESUME_HEADER), and the events the client already has are checked against
the replay (`same_event`) and skipped; a replay that departs ends the stream with an error event and
`[DONE]`. Sending again is safe: an answer is a pure function of the request and its seed, and the engines
abort what a dead router held.

Serve applies proxy middlewares from the import path in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read when
the proxy starts: `ray_serving_environment()` names `proxy_middlewares` for a Ray that dengine starts; on a
cluster started by hand, set it before `ray start`.
"""

from __future__ import annotations

import asyncio
import json
import random

import msgspec
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dengine.sampling_params import MAX_SEED

# the body limits of every dengine HTTP face (the proxy, the routers, a single server); this module stays
# light (no torch) since Serve's proxy imports it
DEFAULT_MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 15.0  # a whole body (at most DEFAULT_MAX_BODY_BYTES) must arrive within this
ROUTER_RETRY_S = 30.0  # a request whose router died is sent again for this long
RETRY_AFTER_S = 5  # protocol.RETRY_AFTER_S (tests/test_serve_proxy.py holds them equal)
RESUME_HEADER = "x-dengine-resume"  # "<response id> <created>": a router answers with these (a resumed stream)
ANSWER_PATHS = ("/v1/completions", "/v1/chat/completions")  # the POSTs sent again (other apps' are sent once)
# Serve's per-request controls a client may set: a timeout would cut every try the same way, and a try not
# watched for disconnects could not be cancelled
DROPPED_HEADERS = (b"content-length", b"transfer-encoding", RESUME_HEADER.encode(), b"x-request-timeout-seconds",
                   b"x-request-disconnect-disabled")
DONE = b"data: [DONE]\n\n"
_seeds = random.Random()


def with_seed(body: bytes, rng: random.Random) -> tuple[bytes, bool]:
    """The body with a seed fixed (unless the client gave one), and whether it asks for a stream. A body that
    is not a JSON object goes on unchanged: the engine replica refuses it in its own words."""
    try:
        request = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # nested past msgspec's depth limit: refused by the replica
        return body, False
    if not isinstance(request, dict):
        return body, False
    if request.get("seed") is None:
        request["seed"] = rng.randrange(MAX_SEED + 1)
        body = msgspec.json.encode(request)
    return body, request.get("stream") is True


def same_event(sent: bytes, replayed: bytes) -> bool:
    """Whether a replayed event says what the sent one said (a final event's timings may differ)."""
    if sent == replayed:
        return True
    try:
        a, b = (msgspec.json.decode(event.removeprefix(b"data: ")) for event in (sent, replayed))
    except (msgspec.DecodeError, RecursionError):
        return False
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    a.pop("dengine", None), b.pop("dengine", None)
    return a == b


def _error_body(message: str, kind: str, code: str) -> bytes:
    """OpenAI's error body, as protocol.error_body writes it (tests/test_serve_proxy.py holds them equal)."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def _error_response(status: int, message: str, kind: str, code: str, headers: dict | None = None) -> Response:
    return Response(_error_body(message, kind, code), status_code=status, media_type="application/json",
                    headers=headers)


def body_timeout_response(timeout_s: float) -> Response:
    """The 408 of a body that did not arrive in time."""
    return _error_response(408, f"the request body did not arrive within {timeout_s:g} s", "invalid_request_error",
                           "request_timeout")


def router_unavailable_response(retry_s: float) -> Response:
    """The 503 of a request that no router answered within retry_s (each one it went to died first)."""
    return _error_response(503, f"no router replica answered the request within {retry_s:g} s (each one it was "
                                "sent to died first); send it again later", "server_error", "router_unavailable",
                           {"Retry-After": str(RETRY_AFTER_S)})


class WholeBodies:
    """ASGI middleware: a POST reaches the app only once its body has arrived (408 when it does not within
    body_timeout_s; a client gone meanwhile reaches nothing), and is sent again while the app returns without
    starting an answer (a router that died), for up to router_retry_s."""

    def __init__(self, app: ASGIApp, body_timeout_s: float = BODY_TIMEOUT_S,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, router_retry_s: float = ROUTER_RETRY_S) -> None:
        self.app, self.body_timeout_s, self.max_body_bytes = app, body_timeout_s, max_body_bytes
        self.router_retry_s = router_retry_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or self._declared_too_large(scope):
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []

        async def read_whole() -> bool:  # False: the client went away
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                buffered.append(message)
                size += len(message.get("body", b""))
                if not message.get("more_body", False) or size > self.max_body_bytes:
                    return True

        try:
            if not await asyncio.wait_for(read_whole(), self.body_timeout_s):
                return
        except asyncio.TimeoutError:
            await body_timeout_response(self.body_timeout_s)(scope, receive, send)
            return
        if buffered[-1].get("more_body", False) or not scope["path"].endswith(ANSWER_PATHS):  # over the limit,
            async def replay() -> Message:  # or not dengine's: on once, as it came
                return buffered.pop(0) if buffered else await receive()

            await self.app(scope, replay, send)
            return
        body = b"".join(message.get("body", b"") for message in buffered)
        buffered.clear()
        await self._answer(scope, body, receive, send)

    async def _answer(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Send the request on until its answer has ended or the client leaves. A try that returns short of that
        is a router that died: wait a little (Serve's proxy learns of the death) and try again, resuming a
        stream that started, for up to router_retry_s."""
        if b'"stream"' in body:  # before the first try: a replay of a stream must be the same stream
            body, _ = with_seed(body, _seeds)
        answer = Answer(send)
        loop = asyncio.get_running_loop()
        deadline, wait = None, 0.1
        while True:
            progress = (answer.started, len(answer.events))
            left, gone = [{"type": "http.request", "body": body, "more_body": False}], False

            async def replay() -> Message:
                nonlocal gone
                if left:
                    return left.pop(0)
                message = await answer.unless_ended(receive())
                gone = gone or message["type"] == "http.disconnect"
                return message

            await self.app(_scope_for(scope, len(body), answer.resume_header()), replay, answer.send)
            if asyncio.current_task().cancelling():  # Serve's proxy swallows a cancellation of this request
                raise asyncio.CancelledError
            if gone or answer.ended or (answer.started and not answer.resumable):
                return
            if answer.events[-1:] == [DONE]:  # cut after its last event: only the response's end is missing
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if (answer.started, len(answer.events)) != progress:  # this router got somewhere: a new death
                deadline, wait = None, 0.1
            deadline = deadline or loop.time() + self.router_retry_s
            if loop.time() + wait > deadline:
                message = f"no router replica answered the request within {self.router_retry_s:g} s"
                if answer.started:
                    await answer.fail(f"{message}; send it again", code="router_unavailable")
                else:
                    await router_unavailable_response(self.router_retry_s)(scope, receive, send)
                return
            await asyncio.sleep(wait)
            wait = min(2 * wait, 2.0)
            answer.again()

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.max_body_bytes
        return False


def _scope_for(scope: Scope, length: int, resume: bytes | None) -> Scope:
    """The request's scope for one try: its body's length (a seed may have been added), and RESUME_HEADER set
    when resuming a stream (a client's own is dropped, as are DROPPED_HEADERS)."""
    headers = [(name, value) for name, value in scope["headers"] if name not in DROPPED_HEADERS]
    headers.append((b"content-length", str(length).encode()))
    if resume is not None:
        headers.append((RESUME_HEADER.encode(), resume))
    return {**scope, "headers": headers}


class Answer:
    """One client's response across tries (a try: one router): what reached the client, and for a stream, how a
    later try goes on from it (its first events checked against those the client has, and skipped)."""

    def __init__(self, send: Send) -> None:
        self.client = send
        self.started = self.ended = self.stream = False
        self.events: list[bytes] = []  # a stream's events the client has
        self.tail = b""  # the first try's bytes after its last whole event (sent as they came)
        self.replaying = False  # this try replays a stream that started
        self.known = self.checked = 0  # a replay: the events the client had when it began; those checked so far
        self.pending = b""  # a replay's bytes not yet a whole event
        self.done = asyncio.Event()  # the client's response has ended

    @property
    def resumable(self) -> bool:
        """A stream cut at an event's end (a whole answer, or half an event, cannot be taken up again)."""
        return self.stream and not self.tail

    def again(self) -> None:
        self.replaying = self.started
        self.known, self.checked, self.pending = len(self.events), 0, b""

    def resume_header(self) -> bytes | None:
        """The id and creation time of the stream being resumed, for the next router to answer with."""
        for event in self.events if self.replaying else ():
            try:
                chunk = msgspec.json.decode(event.removeprefix(b"data: "))
            except msgspec.DecodeError:  # [DONE]
                continue
            if isinstance(chunk, dict) and "id" in chunk and "created" in chunk:  # (an error event has neither)
                return f"{chunk['id']} {chunk['created']}".encode()
        return None

    async def unless_ended(self, received) -> Message:
        """What the client sends next (its disconnect), or a disconnect once its response has ended early (a
        replay that departed): Serve's proxy then cancels the request, so the router and engine stop."""
        receiving, ended = asyncio.ensure_future(received), asyncio.ensure_future(self.done.wait())
        try:
            await asyncio.wait((receiving, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:  # (Serve's proxy cancels its reader when a request is over)
            for task in (receiving, ended):
                task.cancel()
        return receiving.result() if receiving.done() and not receiving.cancelled() else {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.ended:  # a replay that departed, still running until Serve's proxy cancels it
            return
        if not self.replaying:
            if message["type"] == "http.response.start":
                self.started = True
                headers = {name.lower(): value for name, value in message.get("headers", [])}
                self.stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                if self.stream:
                    *whole, self.tail = (self.tail + message.get("body", b"")).split(b"\n\n")
                    self.events += [event + b"\n\n" for event in whole]
                self.ended = not message.get("more_body", False)
            await self.client(message)
            return
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                await self.fail(f"the stream broke (its router died) and its replay was refused ({message['status']})")
            return
        if message["type"] != "http.response.body":
            return
        *whole, self.pending = (self.pending + message.get("body", b"")).split(b"\n\n")
        new = []
        for event in (event + b"\n\n" for event in whole):
            if self.checked == self.known:
                new.append(event)
            elif same_event(self.events[self.checked], event):
                self.checked += 1
            else:
                await self.fail(f"the stream broke (its router died) and its replay departs from what was sent at "
                                f"event {self.checked}; the request cannot be resumed")
                return
        self.events += new
        more = message.get("more_body", False)
        if not more and self.checked < self.known:
            await self.fail("the stream broke (its router died) and its replay ended before what was sent")
            return
        if new or not more:
            await self.client({"type": "http.response.body", "body": b"".join(new), "more_body": more})
        self.ended = not more

    async def fail(self, message: str, code: str = "resume_failed") -> None:
        """End a stream that cannot go on: an error event in OpenAI's shape, then [DONE]."""
        event = b"data: " + _error_body(message, "server_error", code) + b"\n\n"
        await self.client({"type": "http.response.body", "body": event + DONE, "more_body": False})
        self.ended = True
        self.done.set()


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(WholeBodies)]
