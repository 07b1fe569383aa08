"""The Ray Serve application: a router ingress in front of `replicas` engine replicas.

    dengine serve --model llada-sudoku --replicas 2 --num-cpus 1 --port 8000

Each engine replica holds one AsyncLLMEngine behind the OpenAI-compatible request handling (OpenAIServer).
The router (dengine/serve/router.py) takes every HTTP request, retries non-streamed requests and resumes
streams when a replica dies, and drains on shutdown. Serve restarts a replica that dies or fails its
health check, and propagates client disconnects as cancellation through the router to the engine
replica (which aborts the request and frees its KV blocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import (
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from dengine.assets import served_name
from dengine.async_engine import AsyncLLMEngine
from dengine.sampling_params import SamplingParams
from dengine.serve.router import Head, Relay, router_app
from dengine.serve.server import DEFAULT_MAX_BODY_BYTES, OpenAIServer

CUT_OFF_WAIT_S = 5.0  # how long a drain waits for the requests it cut off to send their errors

# what a dead, restarting or overloaded replica raises through a handle: worth another replica's try. Ray's memory
# monitor killing a replica raises OutOfMemoryError, a crashed worker process WorkerCrashedError, a lost node
# NodeDiedError, and a result owned by a dead worker ObjectLostError (OwnerDiedError...): none of them derives from
# RayActorError, and on a busy host the memory monitor is the likeliest death of all.
RETRYABLE = (RayActorError, ActorUnavailableError, OutOfMemoryError, WorkerCrashedError, NodeDiedError,
             ObjectLostError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


@serve.deployment(name="engine", max_ongoing_requests=256, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class EngineReplica:
    """One engine: answers the router's calls with a Head, then the response body in parts."""

    def __init__(self, model: str | None, engine_kwargs: dict[str, Any], defaults: dict[str, Any],
                 model_name: str, num_threads: int | None, max_body_bytes: int) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        show_engine_log()
        self.engine = AsyncLLMEngine.from_model(model, **engine_kwargs)
        replica = serve.get_replica_context().replica_id.unique_id
        self.server = OpenAIServer(self.engine, model_name, SamplingParams(**defaults), replica=replica,
                                   max_body_bytes=max_body_bytes)

    async def call(self, endpoint: str, body: bytes, response_id: str, created: int) -> AsyncIterator[Any]:
        """One POST: its Head, then its body (one part per server-sent event when streaming)."""
        response = await self.server.respond(endpoint, body, response_id, created)
        headers = {"X-Dengine-Replica": self.server.replica}
        if "retry-after" in response.headers:
            headers["Retry-After"] = response.headers["retry-after"]
        yield Head(response.status_code, response.media_type, headers)
        if not isinstance(response, StreamingResponse):
            yield response.body
            return
        events = response.body_iterator
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # leaving early (the router cancelled) aborts the request

    async def get(self, what: str) -> tuple[int, str, dict[str, str], bytes]:
        """/health or /metrics of this replica, as (status, media type, headers, body)."""
        response = self.server.health() if what == "health" else self.server.render_metrics()
        return response.status_code, response.media_type, dict(response.headers), response.body

    def check_health(self) -> None:
        """Serve replaces a replica whose engine loop died."""
        if self.engine.loop_error is not None:
            raise RuntimeError(f"engine loop died: {self.engine.loop_error!r}")


@serve.deployment(name="dengine", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Router:
    """The application's ingress: HTTP in, engine replicas behind; see dengine/serve/router.py."""

    def __init__(self, engines, model_name: str, max_body_bytes: int, retry_timeout_s: float) -> None:
        streaming = engines.options(stream=True)
        self.engines = engines
        self.relay = Relay(lambda *args: streaming.call.remote(*args), RETRYABLE, retry_timeout_s)
        self.model_name, self.max_body_bytes = model_name, max_body_bytes

    def __serve_build_asgi_app__(self):
        return router_app(self.relay, self._get, self.model_name, self.max_body_bytes)

    async def _get(self, what: str) -> Response:
        status, media_type, headers, body = await self.engines.get.remote(what)
        headers.pop("content-length", None)
        return Response(body, status_code=status, media_type=media_type, headers=headers)

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests (503), wait up to grace_s for those in flight, then cut off the rest (an error event
        or a 503 each, their engine work cancelled); returns how many were cut off."""
        self.relay.draining = True
        left = await self._settle(grace_s)
        if left:  # grace period over: each one still in flight gets its error event or 503, and is cancelled
            self.relay.cut_off()
            await self._settle(CUT_OFF_WAIT_S)
        return left

    async def _settle(self, seconds: float) -> int:
        """Wait up to seconds for the requests in flight to end; how many are left."""
        deadline = time.monotonic() + seconds
        while self.relay.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.relay.in_flight

    def stats(self) -> dict[str, int]:
        """Requests in flight, retried and resumed streams: what the relay did so far."""
        relay = self.relay
        return {"in_flight": relay.in_flight, "retries": relay.retries, "resumed_streams": relay.resumed_streams}


def show_engine_log() -> None:
    """The engine's INFO lines (the KV pool it chose and why) on the replica's stderr, which Ray forwards to the
    console of `dengine serve`; without a handler Python drops them."""
    engine_log = logging.getLogger("dengine")
    if not engine_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dengine: %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
        engine_log.propagate = False


def build_app(model: str | None = None, *, replicas: int = 1, num_cpus: float | None = None,
              num_gpus: float | None = None, model_name: str | None = None,
              defaults: dict[str, Any] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              retry_timeout_s: float = 60.0, **engine_kwargs: Any):
    """The Serve application: a router and `replicas` engines, each with num_cpus / num_gpus (one GPU each
    where there are)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if num_gpus is None:
        num_gpus = 1 if torch.cuda.is_available() else 0
    if num_cpus is None:
        num_cpus = 1
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    threads = None if num_gpus else max(1, int(num_cpus))
    defaults = defaults if defaults is not None else {"gen_length": 128, "block_length": 32}
    SamplingParams(**defaults)  # fail here, not in every replica
    name = model_name or served_name(model)
    engines = EngineReplica.options(num_replicas=replicas, ray_actor_options=options).bind(
        None if model is None else str(model), engine_kwargs, defaults, name, threads, max_body_bytes)
    return Router.bind(engines, name, max_body_bytes, retry_timeout_s)
