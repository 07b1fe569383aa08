"""What dengine runs inside Ray Serve's HTTP proxy: a request goes on to a router only once its whole body is in.

Serve's proxy hands a request to a router replica as soon as its headers arrive; the router then pulls the
body from the proxy, message by message, over Ray calls. A client that sends half a body and stops holds one
of the router's request slots and a chain of Ray calls until the router's body timeout: 10,000 such clients
took every slot and raised the other clients' p99 from 3 s to 17 s (docs/benchmarks.md 6b). `WholeBodies` reads a
POST's body in the proxy first, within the same timeout and up to the default body limit: a half-sent body
costs a waiting coroutine in the proxy and ends with a 408 from there; a whole one is replayed to Serve
untouched. A body declared or found larger than the limit is passed on as it streams (the router applies its
own limit, which `build_app(max_body_bytes=)` may set higher, and its own body timeout).

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


def body_timeout_response(timeout_s: float) -> Response:
    """The 408 of a body that did not arrive in time, as protocol.error_response(protocol.body_timeout(...))
    writes it (tests/test_serve_proxy.py holds them equal)."""
    error = {"message": f"the request body did not arrive within {timeout_s:g} s", "type": "invalid_request_error",
             "param": None, "code": "request_timeout"}
    return Response(json.dumps({"error": error}, separators=(",", ":")), status_code=408,
                    media_type="application/json")


class WholeBodies:
    """ASGI middleware: a POST reaches the app only once its body has arrived (408 when it does not within
    body_timeout_s; a client gone meanwhile reaches nothing)."""

    def __init__(self, app: ASGIApp, body_timeout_s: float = BODY_TIMEOUT_S,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.body_timeout_s, self.max_body_bytes = app, body_timeout_s, max_body_bytes

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

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.max_body_bytes
        return False


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(WholeBodies)]
