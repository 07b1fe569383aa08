"""What dengine runs inside Ray Serve's HTTP proxy: a request goes on to a router only once its whole body is in.

Serve's proxy hands a request to a router replica as soon as its headers arrive; the router then pulls the
body from the proxy, message by message, over Ray calls. A client that sends half a body and stops holds one
of the router's request slots and a chain of Ray calls until the router's body timeout: 10,000 such clients
took every slot and raised the other clients' p99 from 3 s to 17 s (docs/benchmarks.md 6b). `WholeBodies` reads a
POST's body in the proxy first, within the same timeout and up to the default body limit: a half-sent body
costs a waiting coroutine in the proxy and ends with a 408 from there; a whole one is replayed to Serve
untouched. A body declared or found larger than the limit is passed on as it streams (the router applies its
own limit, which `build_app(max_body_bytes=)` may set higher, and its own body timeout).

Having the whole body, it can also send a request again: when the router replica it went to dies before
starting an answer (killed, its node lost, Ray's memory monitor), Serve's proxy returns without one (the
client would get the HTTP server's text/plain 500). `WholeBodies` then sends the same request again, to a
router Serve still has, for up to `router_retry_s`; past that the client gets a 503 with Retry-After. A
router that started its answer (every stream starts at once) cannot be replaced: the client's connection ran
through it. Sending again is safe: answering is a pure function of the request, and the engines abort what
a dead router held.

Serve applies proxy middlewares from the import path in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read when
the proxy starts: `ray_serving_environment()` names `proxy_middlewares` for a Ray that dengine starts; on a
cluster started by hand, set it before `ray start`.
"""

from __future__ import annotations

import asyncio
import json

from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# the body limits of every dengine HTTP face (the proxy, the routers, a single server); this module stays
# light (no torch) since Serve's proxy imports it
DEFAULT_MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 15.0  # a whole body (at most DEFAULT_MAX_BODY_BYTES) must arrive within this
ROUTER_RETRY_S = 30.0  # a request whose router died unanswered is sent again for this long
RETRY_AFTER_S = 5  # protocol.RETRY_AFTER_S (tests/test_serve_proxy.py holds them equal)


def _error_response(status: int, message: str, kind: str, code: str, headers: dict | None = None) -> Response:
    """OpenAI's error body, as protocol.error_response writes it (tests/test_serve_proxy.py holds them equal)."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    return Response(json.dumps({"error": error}, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


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
        if buffered[-1].get("more_body", False):  # over the limit: on as it streams, once
            async def replay() -> Message:
                return buffered.pop(0) if buffered else await receive()

            await self.app(scope, replay, send)
            return
        await self._answer(scope, buffered, receive, send)

    async def _answer(self, scope: Scope, body: list[Message], receive: Receive, send: Send) -> None:
        """Send the request (its whole body) on until an answer starts or the client leaves; a try that returns
        with neither is a router that died unanswered: wait a little (Serve's proxy learns of the death) and
        send it again, for up to router_retry_s, then answer 503."""
        loop = asyncio.get_running_loop()
        deadline, wait = loop.time() + self.router_retry_s, 0.1
        while True:
            left, started, gone = list(body), False, False

            async def replay() -> Message:
                nonlocal gone
                if left:
                    return left.pop(0)
                message = await receive()
                gone = gone or message["type"] == "http.disconnect"
                return message

            async def watch(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            await self.app(scope, replay, watch)
            if started or gone:
                return
            if loop.time() + wait > deadline:
                await router_unavailable_response(self.router_retry_s)(scope, receive, send)
                return
            await asyncio.sleep(wait)
            wait = min(2 * wait, 2.0)

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.max_body_bytes
        return False


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(WholeBodies)]
