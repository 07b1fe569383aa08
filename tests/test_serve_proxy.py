"""dengine's middleware in Serve's HTTP proxy: a POST goes on only once its whole body is in."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message

from dengine.serve import protocol
from dengine.serve.proxy import WholeBodies, body_timeout_response, proxy_middlewares


class Inner:
    """An ASGI app that records every request it gets and the body it reads, and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
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


def test_a_whole_body_is_replayed_to_the_app_unchanged():
    inner = Inner()
    parts = [b'{"messages": ', b'[{"role": "user", ', b'"content": "hi"}]}']
    sent = _run(WholeBodies(inner, body_timeout_s=2), _scope(length=sum(map(len, parts))), parts)
    assert inner.bodies == [b"".join(parts)] and sent[0]["status"] == 200


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
