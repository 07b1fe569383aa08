"""The Ray Serve application: `routers` router replicas (the ingress) in front of `replicas` engine replicas.

    dengine serve --model llada-sudoku --replicas 2 --num-cpus 1 --port 8000

Each engine replica holds one AsyncLLMEngine behind the OpenAI-compatible request handling (OpenAIServer).
A router (dengine/serve/router.py) takes an HTTP request from Serve's proxy, retries non-streamed requests
and resumes streams when an engine replica dies, and drains on shutdown. Serve restarts a replica that dies
or fails its health check, and propagates client disconnects as cancellation through the router to the
engine replica (which aborts the request and frees its KV blocks).

More than one router (two by default) keeps the service up when one dies: Serve's proxy sends new requests
to the others. The requests a router held when it died cannot be saved (their client's connection ran
through it): the proxy answers a plain request with a 500 and cuts a stream; the engine replicas notice
the router's death within OWNER_CHECK_S and abort its requests, so no engine decodes for a dead router.
A `control` replica tells every router at once that the application drains (and when the grace period is
over), and sums what the routers report (requests in flight, retries, resumed streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
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
from dengine.serve.router import CUT, Head, Relay, first_unless, next_unless, router_app
from dengine.serve.server import DEFAULT_MAX_BODY_BYTES, OpenAIServer

CUT_OFF_WAIT_S = 5.0  # how long a drain waits for the requests it cut off to send their errors
REPORT_PERIOD_S = 0.2  # how often each router reports to the control replica (and learns of a drain)
REPORT_STALE_S = 2.0  # a router silent this long is dead: its reports no longer count
OWNER_CHECK_S = 1.0  # how often an engine replica checks that the routers of its requests are alive
SERVE_NAMESPACE = "serve"  # the Ray namespace of Serve's replica actors
ROUTER_HEADER = "X-Dengine-Router"  # names the router replica of an answer (its actor: SERVE_REPLICA::dengine#dengine#ID)

logger = logging.getLogger(__name__)

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
        self.routers = RouterWatch(actor_alive)

    async def call(self, endpoint: str, body: bytes, response_id: str, created: int,
                   router: str | None = None) -> AsyncIterator[Any]:
        """One POST: its Head, then its body (one part per server-sent event when streaming). `router` names the
        router actor that reads the answer: if it dies, the request is aborted (nobody would read it)."""
        with self.routers.reading(router) as orphaned:
            response = await first_unless(self.server.respond(endpoint, body, response_id, created), orphaned)
            if response is CUT:
                return
            headers = {"X-Dengine-Replica": self.server.replica}
            if "retry-after" in response.headers:
                headers["Retry-After"] = response.headers["retry-after"]
            yield Head(response.status_code, response.media_type, headers)
            if not isinstance(response, StreamingResponse):
                yield response.body
                return
            events = response.body_iterator
            try:
                while True:
                    try:
                        event = await next_unless(events, orphaned)
                    except StopAsyncIteration:
                        return
                    if event is CUT:
                        return
                    yield event
            finally:
                await events.aclose()  # leaving early (the router cancelled or died) aborts the request

    async def get(self, what: str) -> tuple[int, str, dict[str, str], bytes]:
        """/health or /metrics of this replica, as (status, media type, headers, body)."""
        response = self.server.health() if what == "health" else self.server.render_metrics()
        return response.status_code, response.media_type, dict(response.headers), response.body

    def check_health(self) -> None:
        """Serve replaces a replica whose engine loop died."""
        if self.engine.loop_error is not None:
            raise RuntimeError(f"engine loop died: {self.engine.loop_error!r}")


class RouterWatch:
    """The routers reading this engine replica's answers, checked every `period_s` while any is: when one has
    died, `reading` sets its requests' event, and they end (their engine work aborted)."""

    def __init__(self, alive: Callable[[str], bool], period_s: float = OWNER_CHECK_S) -> None:
        self.alive = alive
        self.period_s = period_s
        self.readers: dict[str, int] = {}
        self.died: dict[str, asyncio.Event] = {}
        self.watching: asyncio.Task | None = None

    @contextlib.contextmanager
    def reading(self, router: str | None):
        """An event set if `router` dies while the block runs (never, for None: a caller Serve does not name)."""
        if router is None:
            yield asyncio.Event()
            return
        died = self.died.setdefault(router, asyncio.Event())
        self.readers[router] = self.readers.get(router, 0) + 1
        if self.watching is None or self.watching.done():
            self.watching = asyncio.ensure_future(self._watch())
        try:
            yield died
        finally:
            self.readers[router] -= 1
            if not self.readers[router]:
                del self.readers[router], self.died[router]

    async def _watch(self) -> None:
        while self.readers:
            await asyncio.sleep(self.period_s)
            for router in [r for r in self.readers if not self.died[r].is_set()]:
                if not await asyncio.to_thread(self.alive, router) and router in self.died:
                    logger.warning("router %s died: its %d request(s) here are aborted", router,
                                   self.readers.get(router, 0))
                    self.died[router].set()


def actor_alive(name: str) -> bool:
    """Whether the named Serve replica actor is alive (Serve never restarts one: a new replica gets a new name)."""
    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:  # dead, or never existed
        return False
    return True


@serve.deployment(name="control", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Control:
    """What every router must learn at once (the application drains; the grace period is over), and what each
    router reports every REPORT_PERIOD_S (its requests in flight, retries, resumed streams, whether it drains)."""

    def __init__(self) -> None:
        self.draining = False
        self.cut = False
        self.reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, router: str, stats: dict[str, Any]) -> tuple[bool, bool]:
        """A router's report; answers (draining, cut off)."""
        self.reports[router] = (time.monotonic(), stats)
        return self.draining, self.cut

    def routers(self) -> dict[str, dict[str, Any]]:
        """The last report of each live router (silent for less than REPORT_STALE_S)."""
        now = time.monotonic()
        return {router: stats for router, (at, stats) in self.reports.items() if now - at < REPORT_STALE_S}

    def stats(self) -> dict[str, int]:
        """Requests in flight, retried and resumed streams, summed over the live routers."""
        live = self.routers().values()
        return {key: sum(r[key] for r in live) for key in ("in_flight", "retries", "resumed_streams")} | {
            "routers": len(live)}

    async def drain(self, grace_s: float) -> int:
        """Every router refuses new requests (503) from its next report on; waits up to grace_s for the requests in
        flight, then cuts off the rest (an error event or a 503 each, their engine work cancelled); returns how
        many were cut off."""
        self.draining = True
        left = await self._settle(grace_s)
        if left:
            self.cut = True
            await self._settle(CUT_OFF_WAIT_S)
        return left

    async def _settle(self, seconds: float) -> int:
        """Wait up to seconds until every live router drains with nothing in flight; the requests left (a router
        that has not yet reported its drain counts one, since it may have taken one since its last report)."""
        deadline = time.monotonic() + seconds
        while (left := self._in_flight()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return left

    def _in_flight(self) -> int:
        return sum(stats["in_flight"] if stats["draining"] else max(1, stats["in_flight"])
                   for stats in self.routers().values())


@serve.deployment(name="dengine", num_replicas=2, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Router:
    """The application's ingress: HTTP in, engine replicas behind; see dengine/serve/router.py."""

    async def __init__(self, engines, control, model_name: str, max_body_bytes: int, retry_timeout_s: float) -> None:
        streaming = engines.options(stream=True)
        self.engines, self.control = engines, control
        self.name = ray.get_runtime_context().get_actor_name()  # named to the engines, which watch it
        replica = serve.get_replica_context().replica_id.unique_id
        self.relay = Relay(lambda *args: streaming.call.remote(*args, self.name), RETRYABLE, retry_timeout_s,
                           headers={ROUTER_HEADER: replica})
        self.model_name, self.max_body_bytes = model_name, max_body_bytes
        self.reporting = asyncio.ensure_future(self._report())

    def __serve_build_asgi_app__(self):
        return router_app(self.relay, self._get, self.model_name, self.max_body_bytes)

    async def _get(self, what: str) -> Response:
        status, media_type, headers, body = await self.engines.get.remote(what)
        headers.pop("content-length", None)
        return Response(body, status_code=status, media_type=media_type, headers=headers)

    async def _report(self) -> None:
        """Report to the control replica every REPORT_PERIOD_S; start draining, or cut off, when it says so. Once
        the control replica has heard that this router drains with nothing in flight, stop: nothing is left to
        learn (a draining router takes no request), and no call is pending when the service's Ray shuts down."""
        failing = False
        while True:
            stats = self.stats()
            try:
                draining, cut = await self.control.report.remote(self.name, stats)
            except Exception as exc:  # the control replica restarting: keep serving, report again
                if not failing:
                    logger.warning("router %s cannot reach the control replica (%r)", self.name, exc)
                failing = True
            else:
                failing = False
                if stats["draining"] and not stats["in_flight"]:
                    return
                self.relay.draining = self.relay.draining or draining
                if cut:
                    self.relay.cut_off()
            await asyncio.sleep(REPORT_PERIOD_S)

    def stats(self) -> dict[str, Any]:
        """What the relay did so far: requests in flight, retried and resumed streams; whether it drains; pid."""
        relay = self.relay
        return {"in_flight": relay.in_flight, "retries": relay.retries, "resumed_streams": relay.resumed_streams,
                "draining": relay.draining, "pid": os.getpid()}


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


def ray_serving_environment() -> None:
    """What a Ray started to serve dengine needs, each only where the user has not set it. Ray reads these when
    its processes start: they change nothing on a cluster that is already up (`--address`)."""
    # a busy machine starts Serve's HTTP proxy slowly; Serve's default 5 s readiness check would kill it
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    # Ray >= 2.56's memory monitor kills every worker of the node in one pass once the host crosses its threshold
    # (measured: the Serve controller, both routers, control and both engines, for 77 MB over; docs/benchmarks.md
    # 6b: 8 of 300 lost); the policy by owner group kills one worker a look (1 of 300 lost, a router killed)
    os.environ.setdefault("RAY_worker_killing_policy_by_group", "true")
    # the proxy admits a request only once its whole body is in (dengine/serve/proxy.py)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "dengine.serve.proxy.proxy_middlewares")


def build_app(model: str | None = None, *, replicas: int = 1, routers: int = 2, num_cpus: float | None = None,
              num_gpus: float | None = None, model_name: str | None = None,
              defaults: dict[str, Any] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              retry_timeout_s: float = 60.0, **engine_kwargs: Any):
    """The Serve application: `routers` routers, a control replica and `replicas` engines, each engine with
    num_cpus / num_gpus (one GPU each where there are); routers and control take no CPU of their own."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if routers < 1:
        raise ValueError(f"routers must be >= 1, got {routers}")
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
    return Router.options(num_replicas=routers).bind(engines, Control.bind(), name, max_body_bytes, retry_timeout_s)
