"""dengine's middleware in Serve's HTTP proxy: a POST goes on only once its whole body is in, and is sent again
when the router it went to died before answering."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message

from dengine.serve import protocol
from dengine.serve.proxy import (RESUME_HEADER, RETRY_AFTER_S, WholeBodies, body_timeout_response, proxy_middlewares,
                                 router_unavailable_response)


async def _read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class Inner:
    """An ASGI app that records every request it gets and the body it reads, and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body = await _read_body(receive)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _scope(method: str = "POST", length: int | None = None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": headers}


def _run(app, scope, parts: list[bytes], then_wait: bool = False, disconnect: bool = False) -> list[Message]:
    """Send parts as http.request messages (the last with more_body unless then_wait is False), then a
    disconnect or nothing (a client that stalls); returns what the app sent."""
    messages = [{"type": "http.request", "body": b, "more_body": i < len(parts) - 1 or then_wait}
                for i, b in enumerate(parts)]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            await asyncio.sleep(0.01)
            return messages.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # a client that sends nothing more
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def test_a_whole_body_is_replayed_to_the_app_unchanged_but_for_a_seed_fixed_when_it_has_none():
    inner = Inner()
    parts = [b'{"messages": ', b'[{"role": "user", ', b'"content": "hi"}], ', b'"seed": 3}']
    sent = _run(WholeBodies(inner, body_timeout_s=2), _scope(length=sum(map(len, parts))), parts)
    assert inner.bodies == [b"".join(parts)] and sent[0]["status"] == 200
    _run(WholeBodies(inner, body_timeout_s=2), _scope(), [b'{"prompt": "x", ', b'"stream": true}'])
    seeded = json.loads(inner.bodies[1])
    assert seeded.pop("seed") in range(protocol.MAX_SEED + 1) and seeded == {"prompt": "x", "stream": True}
    for body in (b"[1, 2]", b"not json", b'{"seed": null'):  # the replica refuses these in its own words
        _run(WholeBodies(inner, body_timeout_s=2), _scope(), [body])
        assert inner.bodies[-1] == body


def test_a_half_sent_body_gets_408_from_the_proxy_and_never_reaches_the_app():
    inner = Inner()
    sent = _run(WholeBodies(inner, body_timeout_s=0.3), _scope(length=200), [b'{"messages"'], then_wait=True)
    assert inner.bodies == []
    assert sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_timeout" and "0.3 s" in error["message"]


def test_a_client_gone_mid_body_reaches_nothing_and_gets_nothing():
    inner = Inner()
    assert _run(WholeBodies(inner, body_timeout_s=2), _scope(length=200), [b'{"mess'], then_wait=True,
                disconnect=True) == []
    assert inner.bodies == []


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_streams_on_for_the_router_to_refuse(declared):
    """Declared too large: passed on at once; found too large while buffering: passed on with what was read."""
    inner = Inner()
    parts = [b"x" * 60, b"y" * 60, b"z" * 60]
    app = WholeBodies(inner, body_timeout_s=2, max_body_bytes=100)
    sent = _run(app, _scope(length=180 if declared else None), parts)
    assert inner.bodies == [b"".join(parts)] and sent[0]["status"] == 200


class DiesFirst(Inner):
    """Serve's proxy when the router it picked dies before answering: it reads the request, then returns
    without starting a response (its `send_http_response_on_exception` sends nothing for a 500). The first
    `deaths` tries go so; after them it answers 200 (another router), or with `answer` (status, body)."""

    def __init__(self, deaths: int, answer: tuple[int, bytes] = (200, b"ok")) -> None:
        super().__init__()
        self.deaths, self.answer = deaths, answer

    async def __call__(self, scope, receive, send) -> None:
        body = await _read_body(receive)
        self.bodies.append(body)
        if len(self.bodies) <= self.deaths:
            return
        await send({"type": "http.response.start", "status": self.answer[0], "headers": []})
        await send({"type": "http.response.body", "body": self.answer[1]})


def test_a_request_whose_router_died_unanswered_is_sent_again_whole_until_one_answers():
    parts = [b'{"prompt": ', b'"Add: a1 b2", "seed": 1}']
    inner = DiesFirst(deaths=3)
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(length=24), parts)
    assert inner.bodies == [b"".join(parts)] * 4
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] and sent[0]["status"] == 200


def test_a_request_no_router_answers_gets_a_retryable_503_in_openai_shape():
    inner = DiesFirst(deaths=10 ** 6)
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=0.5), _scope(), [b"{}"])
    assert 2 <= len(inner.bodies) <= 4  # 0.1 + 0.2 s waits within 0.5 s (the next, 0.4 s, would pass it)
    assert sent[0]["status"] == 503 and (b"retry-after", str(RETRY_AFTER_S).encode()) in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "router_unavailable" and error["type"] == "server_error"
    assert RETRY_AFTER_S == protocol.RETRY_AFTER_S
    same = protocol.unavailable(error["message"], "router_unavailable")
    assert router_unavailable_response(0.5).body == protocol.error_body(same)


@pytest.mark.parametrize("status", [500, 503, 408])
def test_an_answer_that_started_is_never_sent_again_whatever_its_status(status):
    inner = DiesFirst(deaths=0, answer=(status, b'{"error": {}}'))
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(), [b"{}"])
    assert len(inner.bodies) == 1 and sent[0]["status"] == status


def test_a_client_gone_while_its_request_was_out_is_not_sent_again():
    class Left(Inner):  # Serve's proxy noticing the client leave: it cancels the request and answers nothing
        async def __call__(self, scope, receive, send) -> None:
            body = await _read_body(receive)
            self.bodies.append(body)
            assert (await receive())["type"] == "http.disconnect"

    inner = Left()
    assert _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(), [b"[]"], disconnect=True) == []
    assert inner.bodies == [b"[]"]


def test_a_body_over_the_limit_is_not_held_so_not_sent_again():
    inner = DiesFirst(deaths=1)
    app = WholeBodies(inner, body_timeout_s=2, max_body_bytes=100, router_retry_s=8)
    assert _run(app, _scope(), [b"x" * 60, b"y" * 60, b"z" * 60]) == []  # the HTTP server's 500 follows
    assert inner.bodies == [b"x" * 60 + b"y" * 60 + b"z" * 60]


class Streams:
    """Routers that stream deterministically: `events` events a request, each naming the request's seed and
    its index, with the response id and time a router picks (its own, or RESUME_HEADER's); the final one has
    per-router timings. Try i dies (returns, as Serve's proxy does) after dies[i] events; `depart` makes
    the tries after the first answer differently (a model without batch invariance). Like Serve's proxy, a
    try stops when the client's side says disconnect (`cancelled` lists those tries)."""

    def __init__(self, dies: list[int], events: int = 5, depart: bool = False, pause: float = 0.001) -> None:
        self.dies, self.events, self.depart, self.pause = dies, events, depart, pause
        self.tries: list[tuple[dict, str | None]] = []
        self.cancelled: list[int] = []

    async def __call__(self, scope, receive, send) -> None:
        body = await _read_body(receive)
        request = json.loads(body)
        headers = dict(scope["headers"])
        assert int(headers[b"content-length"]) == len(body)
        resume = headers.get(RESUME_HEADER.encode())
        assert not {b"x-request-timeout-seconds", b"x-request-disconnect-disabled"} & set(headers)
        self.tries.append((request, resume))
        try_ = len(self.tries) - 1
        response_id, created = resume.decode().split() if resume else (f"cmpl-router{try_}", 1000 + try_)
        listening = asyncio.ensure_future(receive())
        try:
            await self._stream(request, try_, response_id, created, listening, send)
        finally:
            listening.cancel()

    async def _stream(self, request, try_, response_id, created, listening, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        for index in range(self.events):
            await asyncio.sleep(self.pause)
            if listening.done():
                assert listening.result()["type"] == "http.disconnect"
                self.cancelled.append(try_)
                return
            if try_ < len(self.dies) and index == self.dies[try_]:
                return
            text = f"{request['seed']}:{index}" + ("'" if self.depart and try_ else "")
            event = {"id": response_id, "created": int(created), "choices": [{"text": text}]}
            if index == self.events - 1:
                event["dengine"] = {"latency_s": try_}
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _events(sent: list[Message]) -> list:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body.endswith(b"data: [DONE]\n\n") and not sent[-1].get("more_body", False), body
    return [json.loads(event.removeprefix(b"data: ")) for event in body.split(b"\n\n")[:-2]]


@pytest.mark.parametrize("dies", [[2], [0], [3, 1], [4, 4]])
def test_a_stream_whose_router_died_is_resumed_on_another_with_the_same_seed_id_and_time(dies):
    """The client gets the uninterrupted stream (one response start, each event once, the first router's id
    and time throughout), whether a router dies before its first event, midway, or on the replay."""
    inner = Streams(dies)
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(), [b'{"prompt": "x", "stream": true}'])
    seed = inner.tries[0][0]["seed"]
    assert [request for request, _ in inner.tries] == [{"prompt": "x", "stream": True, "seed": seed}] * len(inner.tries)
    assert len(inner.tries) == len(dies) + 1 and inner.tries[0][1] is None and inner.cancelled == []
    assert [m["type"] for m in sent].count("http.response.start") == 1
    events = _events(sent)
    assert [e["choices"][0]["text"] for e in events] == [f"{seed}:{i}" for i in range(5)]
    first = 0 if dies[0] else min([i for i, d in enumerate(dies) if d] or [len(dies)])  # the try that sent event 0
    assert {(e["id"], e["created"]) for e in events} == {(f"cmpl-router{first}", 1000 + first)}
    resumes = [resume for _, resume in inner.tries[first + 1:]]
    assert resumes == [f"cmpl-router{first} {1000 + first}".encode()] * len(resumes)


def test_each_death_of_a_long_stream_gets_its_own_retry_time():
    """Two deaths further apart than router_retry_s: the second router got somewhere, so its death is a new one."""
    inner = Streams([2, 4], events=6, pause=0.06)
    app = WholeBodies(inner, body_timeout_s=2, router_retry_s=0.25)
    events = _events(_run(app, _scope(), [b'{"prompt": "x", "stream": true}']))
    assert [e["choices"][0]["text"] for e in events] == [f"{inner.tries[0][0]['seed']}:{i}" for i in range(6)]
    assert len(inner.tries) == 3


def test_a_stream_cut_after_its_done_is_only_ended_not_replayed():
    class DiesAtTheEnd(Inner):  # the router died between [DONE] and the response's final (empty) message
        async def __call__(self, scope, receive, send) -> None:
            self.bodies.append((await receive())["body"])
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            for event in (b'data: {"id": "cmpl-1", "created": 1, "choices": []}\n\n', b"data: [DONE]\n\n"):
                await send({"type": "http.response.body", "body": event, "more_body": True})

    inner = DiesAtTheEnd()
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(), [b'{"stream": true}'])
    assert len(inner.bodies) == 1 and len(_events(sent)) == 1
    assert b"".join(m.get("body", b"") for m in sent[1:]).count(b"[DONE]") == 1


def test_a_stream_whose_first_event_is_an_error_is_resumed_without_a_response_id():
    """The router's error event then [DONE] are two messages; a death between them leaves an event with no id:
    the replay is asked for no particular id, and the client gets the error event and one [DONE]."""
    error = b'data: {"error": {"message": "x", "type": "server_error", "param": null, "code": null}}\n\n'

    class ErrorFirst(Inner):
        async def __call__(self, scope, receive, send) -> None:
            self.bodies.append(dict(scope["headers"]).get(RESUME_HEADER.encode()))
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": error, "more_body": True})
            if len(self.bodies) > 1:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    inner = ErrorFirst()
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(), [b'{"stream": true}'])
    assert inner.bodies == [None, None] and _events(sent)[0]["error"]["message"] == "x" and len(_events(sent)) == 1


def test_serves_per_request_controls_and_other_apps_posts_are_left_as_they_are():
    """dengine's routes: a client's own Serve timeout / disconnect controls are dropped (a timeout would cut
    every try alike); another application's POST goes on once, unchanged, even if its router dies."""
    inner = Streams([])
    scope = _scope()
    scope["headers"] += [(b"x-request-timeout-seconds", b"1"), (b"x-request-disconnect-disabled", b"?1")]
    _run(WholeBodies(inner, body_timeout_s=2), scope, [b'{"prompt": "x", "stream": true}'])
    other = DiesFirst(deaths=1)
    other_scope = {**_scope(), "path": "/classify"}
    assert _run(WholeBodies(other, body_timeout_s=2, router_retry_s=8), other_scope, [b'{"text": "x"}']) == []
    assert other.bodies == [b'{"text": "x"}']


def test_a_request_cancelled_in_the_proxy_is_not_sent_again():
    """Serve's proxy swallows the cancellation of a request it is serving (its `except BaseException`) and
    returns without an answer, as for a dead router: the middleware must stop, not send it again."""
    class Swallows(Inner):
        async def __call__(self, scope, receive, send) -> None:
            self.bodies.append((await receive())["body"])
            assert len(self.bodies) == 1, "sent again after its cancellation"
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return

    inner = Swallows()

    async def main() -> None:
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> Message:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message: Message) -> None:
            raise AssertionError(message)

        task = asyncio.ensure_future(WholeBodies(inner, body_timeout_s=2, router_retry_s=8)(_scope(), receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert len(inner.bodies) == 1


def test_a_resumed_stream_whose_replay_departs_ends_with_an_error_event_and_done():
    inner = Streams([3], depart=True)
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=8), _scope(), [b'{"prompt": "x", "stream": true}'])
    events = _events(sent)
    assert [e.get("choices", [{}])[0].get("text") for e in events[:3]] == [f"{inner.tries[0][0]['seed']}:{i}"
                                                                           for i in range(3)]
    assert events[3]["error"]["code"] == "resume_failed" and "event 0" in events[3]["error"]["message"]
    same = protocol.RequestError(events[3]["error"]["message"], status=502, kind="server_error", code="resume_failed")
    assert events[3] == json.loads(protocol.error_body(same)), "the router's error event shape"
    assert len(events) == 4 and len(inner.tries) == 2
    assert inner.cancelled == [1], "the departed replay is cancelled, not decoded to its end"


def test_a_stream_no_router_resumes_ends_with_a_retryable_error_event_and_done():
    inner = Streams([2] + [0] * 1000)
    sent = _run(WholeBodies(inner, body_timeout_s=2, router_retry_s=0.5), _scope(), [b'{"prompt": "x", "stream": true}'])
    events = _events(sent)
    assert len(events) == 3 and events[2]["error"]["code"] == "router_unavailable"


def test_a_clients_own_resume_header_never_reaches_a_router():
    inner = Streams([])
    scope = _scope()
    scope["headers"].append((RESUME_HEADER.encode(), b"cmpl-mine 1"))
    sent = _run(WholeBodies(inner, body_timeout_s=2), scope, [b'{"prompt": "x", "stream": true}'])
    assert inner.tries[0][1] is None and {e["id"] for e in _events(sent)} == {"cmpl-router0"}


def test_gets_pass_straight_through_and_serve_gets_a_starlette_middleware():
    inner = Inner()
    sent = _run(WholeBodies(inner, body_timeout_s=0.1), _scope(method="GET"), [b""])
    assert inner.bodies == [b""] and sent[0]["status"] == 200
    (middleware,) = proxy_middlewares()
    assert middleware.cls is WholeBodies


def test_the_proxy_module_stays_light_and_its_408_is_the_servers_error_shape():
    """Serve's proxy imports dengine/serve/proxy.py: no torch there; its 408 body is protocol's error body."""
    import subprocess
    import sys

    code = "import sys, dengine.serve.proxy; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    error = protocol.RequestError("the request body did not arrive within 2.5 s", status=408, code="request_timeout")
    assert body_timeout_response(2.5).body == protocol.error_body(error)
