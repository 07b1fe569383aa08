"""The router's relay against scripted engine replicas (no Ray): retries, resumed streams, refused replays,
draining. tests/test_serve_ray.py kills a real replica."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest

from dengine.serve.proxy import same_event
from dengine.serve.router import DONE, Head, Relay


class Died(Exception):
    """What a dead replica raises through the handle."""


def _event(text: str, reason: str | None = None, **extra) -> bytes:
    body = {"id": "cmpl-1", "choices": [{"index": 0, "text": text, "finish_reason": reason}], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Replicas:
    """Attempt i of a request plays scripts[i]: a Head, then its items (Died raises midway)."""

    def __init__(self, *scripts, status: int = 200) -> None:
        self.scripts, self.status, self.bodies, self.closed = scripts, status, [], 0

    def call(self, endpoint, body, response_id, created):
        script = self.scripts[min(len(self.bodies), len(self.scripts) - 1)]
        self.bodies.append(body)

        async def parts():
            try:
                if script is Died:
                    raise Died()
                yield Head(self.status, "text/event-stream", {"X-Dengine-Replica": str(len(self.bodies))})
                for item in script:
                    if item is Died:
                        raise Died()
                    yield item
            finally:
                self.closed += 1

        return parts()


async def _collect(relay: Relay, body: dict, endpoint: str = "completions"):
    response = await relay.forward(endpoint, json.dumps(body).encode())
    if hasattr(response, "body_iterator"):
        return response.status_code, [part async for part in response.body_iterator]
    return response.status_code, [response.body]


def test_a_broken_stream_is_resumed_on_another_replica_with_the_same_seed():
    events = [_event("ab"), _event("cd"), _event("ef", "stop", dengine={"latency_s": 1.0}), DONE]
    replay = events[:2] + [_event("ef", "stop", dengine={"latency_s": 2.5}), DONE]  # timings may differ
    replicas = Replicas(events[:2] + [Died], replay)
    relay = Relay(replicas.call, (Died,), retry_timeout_s=5)
    status, got = asyncio.run(_collect(relay, {"prompt": "x", "stream": True, "temperature": 1.0}))
    assert status == 200 and got == events[:2] + replay[2:]
    assert relay.resumed_streams == 1 and relay.in_flight == 0
    first, second = (msgspec.json.decode(b) for b in replicas.bodies)
    assert first == second and isinstance(first["seed"], int), "the router fixes one seed for every attempt"
    assert replicas.closed == 2


def test_a_replay_that_departs_from_what_was_sent_ends_with_an_error_event_and_done():
    events = [_event("ab"), _event("cd"), _event("ef", "stop"), DONE]
    replicas = Replicas(events[:2] + [Died], [events[0], _event("cX"), _event("ef", "stop"), DONE])
    relay = Relay(replicas.call, (Died,), retry_timeout_s=5)
    status, got = asyncio.run(_collect(relay, {"prompt": "x", "stream": True, "seed": 3}))
    assert got[:2] == events[:2] and got[-1] == DONE and len(got) == 4
    error = json.loads(got[2][len(b"data: "):])["error"]
    assert error["code"] == "resume_failed" and "event 1" in error["message"]
    assert msgspec.json.decode(replicas.bodies[0])["seed"] == 3, "a client's seed is kept"
    assert relay.in_flight == 0


def test_a_non_streamed_request_is_retried_until_a_replica_answers_whole():
    answer = b'{"choices": [{"text": "42"}]}'
    replicas = Replicas(Died, [b'{"choi', Died], [answer])
    relay = Relay(replicas.call, (Died,), retry_timeout_s=5)
    status, got = asyncio.run(_collect(relay, {"prompt": "x"}))
    assert status == 200 and got == [answer] and len(replicas.bodies) == 3 and relay.retries >= 1


def test_no_replica_within_the_retry_timeout_is_a_503_in_openai_shape():
    relay = Relay(Replicas(Died).call, (Died,), retry_timeout_s=0.3)
    response = asyncio.run(relay.forward("completions", b'{"prompt": "x"}'))
    assert response.status_code == 503 and json.loads(response.body)["error"]["code"] == "replica_unavailable"
    assert response.headers["retry-after"] == "5", "OpenAI's client waits that long before retrying"


def test_errors_other_than_a_dead_replica_are_not_retried():
    replicas = Replicas([b"x", ValueError])

    def call(*args):
        parts = replicas.call(*args)

        async def raising():
            async for part in parts:
                if part is ValueError:
                    raise ValueError("engine bug")
                yield part

        return raising()

    relay = Relay(call, (Died,), retry_timeout_s=5)
    with pytest.raises(ValueError, match="engine bug"):
        asyncio.run(_collect(relay, {"prompt": "x"}))
    assert len(replicas.bodies) == 1 and relay.in_flight == 0


def test_draining_refuses_new_requests_with_503():
    relay = Relay(Replicas([b"{}"]).call, (Died,))
    relay.draining = True
    response = asyncio.run(relay.forward("completions", b'{"prompt": "x"}'))
    assert response.status_code == 503 and json.loads(response.body)["error"]["code"] == "shutting_down"
    assert response.headers["retry-after"] == "5"


def test_refused_requests_keep_their_status_and_are_not_retried():
    replicas = Replicas([b'{"error": {"message": "bad"}}'], status=400)
    relay = Relay(replicas.call, (Died,))
    status, _ = asyncio.run(_collect(relay, {"prompt": "x", "stream": True}))
    assert status == 400 and len(replicas.bodies) == 1


def test_same_event_ignores_only_the_final_events_timings():
    assert same_event(_event("a", "stop", dengine={"latency_s": 1}), _event("a", "stop", dengine={"latency_s": 2}))
    assert not same_event(_event("a"), _event("b"))
    assert not same_event(_event("a"), b"")


def test_a_stream_failing_for_another_reason_ends_with_an_error_event_not_a_cut():
    def call(*args):
        async def parts():
            yield Head(200, "text/event-stream", {})
            yield _event("ab")
            raise ValueError("engine bug")

        return parts()

    relay = Relay(call, (Died,))
    status, got = asyncio.run(_collect(relay, {"prompt": "x", "stream": True}))
    assert got[0] == _event("ab") and got[-1] == DONE
    assert json.loads(got[1][len(b"data: "):])["error"]["type"] == "server_error" and relay.in_flight == 0


@pytest.mark.parametrize("death", ["ActorDiedError", "OutOfMemoryError", "WorkerCrashedError", "NodeDiedError",
                                   "OwnerDiedError"])
def test_every_way_ray_reports_a_dead_replica_is_retried(death):
    """The memory monitor's OutOfMemoryError, a crashed worker, a lost node, a lost result: none derives from
    RayActorError, and each must be retried on another replica like a killed actor."""
    exceptions = pytest.importorskip("ray.exceptions")
    from dengine.serve.deployment import RETRYABLE

    error_type = getattr(exceptions, death)
    assert issubclass(error_type, RETRYABLE)
    error = error_type.__new__(error_type)  # Ray's constructors want task context; the type is what counts
    answer = b'{"choices": [{"text": "42"}]}'

    def call(endpoint, body, response_id, created):
        attempts.append(body)

        async def parts():
            if len(attempts) == 1:
                raise error
            yield Head(200, "application/json", {})
            yield answer

        return parts()

    attempts = []
    relay = Relay(call, RETRYABLE, retry_timeout_s=5)
    status, got = asyncio.run(_collect(relay, {"prompt": "x"}))
    assert status == 200 and got == [answer] and len(attempts) == 2


def test_requests_still_in_flight_when_the_grace_period_ends_get_an_error_and_are_cancelled():
    """A stream gets an error event (shutting_down) then [DONE]; a whole answer a 503; the engine work stops."""
    cancelled = []

    def call(endpoint, body, response_id, created):
        async def parts():
            try:
                yield Head(200, "text/event-stream", {})
                yield _event("ab")
                await asyncio.sleep(3600)  # a long decode
            finally:
                cancelled.append(endpoint)

        return parts()

    async def run():
        relay = Relay(call, (Died,), retry_timeout_s=5)
        stream = await relay.forward("completions", json.dumps({"prompt": "x", "stream": True}).encode())
        whole = asyncio.ensure_future(relay.forward("chat_completions", json.dumps({"messages": []}).encode()))
        events = stream.body_iterator
        first = await anext(events)
        await asyncio.sleep(0.05)
        assert relay.in_flight == 2
        relay.cut_off()
        rest = [event async for event in events]
        return first, rest, await whole, relay

    first, rest, whole, relay = asyncio.run(run())
    assert first == _event("ab") and rest[-1] == DONE and len(rest) == 2
    assert json.loads(rest[0][len(b"data: "):])["error"]["code"] == "shutting_down"
    assert whole.status_code == 503 and json.loads(whole.body)["error"]["code"] == "shutting_down"
    assert relay.in_flight == 0 and sorted(cancelled) == ["chat_completions", "completions"]


def test_the_relay_sentinels_keep_their_identity_through_pickling():
    """Serve pickles the deployment classes by value (their module's names are the Deployments), with the globals
    they use: an `object()` sentinel would arrive as a new object in a replica, `part is CUT` would never hold,
    and an engine replica whose router died would spin yielding it."""
    cloudpickle = pytest.importorskip("cloudpickle")
    from dengine.serve.router import CUT, END

    for sentinel in (CUT, END):
        assert cloudpickle.loads(cloudpickle.dumps(sentinel)) is sentinel
    deployment = pytest.importorskip("dengine.serve.deployment")
    assert b"_make_skeleton_class" in cloudpickle.dumps(deployment.EngineReplica.func_or_class)  # by value, as said


@pytest.mark.parametrize("header, fixed", [("cmpl-9f2a 1796500000", ("cmpl-9f2a", 1796500000)),
                                           ("chatcmpl-x1 7", ("chatcmpl-x1", 7)), (None, None), ("cmpl-1", None),
                                           ("cmpl-1 soon", None), ("cmpl 1\r\nX: y 5", None), ("", None)])
def test_a_resumed_streams_router_answers_with_the_response_id_and_time_serves_proxy_asks_for(header, fixed):
    """Serve's proxy resuming a stream whose router died asks the next router for the dead one's response id and
    creation time (RESUME_HEADER); anything not of that form is ignored and the router picks its own."""
    calls = []

    def call(endpoint, body, response_id, created):
        calls.append((response_id, created))

        async def parts():
            yield Head(200, "text/event-stream", {})
            yield DONE

        return parts()

    relay = Relay(call, (Died,), retry_timeout_s=1)
    response = asyncio.run(relay.forward("completions", b'{"prompt": "x", "stream": true}', header))
    assert response.status_code == 200
    if fixed is None:
        assert calls[0][0].startswith("cmpl-") and calls[0][0] != "cmpl-1" and abs(calls[0][1] - time.time()) < 60
    else:
        assert calls == [fixed]


def test_a_router_reports_until_the_control_replica_knows_it_drained_with_nothing_in_flight(monkeypatch):
    """The router's report loop (deployment.Router._report, run on a stand-in router): it reports while serving,
    learns the drain from the control replica's answer, keeps reporting while a request is in flight, and stops
    after the first report that says it drains with nothing in flight, so that no call to the control replica
    is pending when `dengine serve` shuts its Ray down."""
    deployment = pytest.importorskip("dengine.serve.deployment")
    monkeypatch.setattr(deployment, "REPORT_PERIOD_S", 0.001)
    relay = Relay(Replicas().call, (Died,), retry_timeout_s=1)
    relay.in_flight = 1
    sent = []

    class Control:
        class report:  # noqa: N801 (a handle's method: control.report.remote(...))
            @staticmethod
            def remote(name, stats):
                sent.append(dict(stats))
                if len(sent) == 3:
                    relay.in_flight = 0  # the last request finished between two reports

                async def answer():
                    return len(sent) >= 2, False  # the drain starts with the second report's answer
                return answer()

    router = type("Router", (), {"name": "r", "control": Control(), "relay": relay})()
    router.stats = lambda: deployment.Router.func_or_class.stats(router)
    asyncio.run(asyncio.wait_for(deployment.Router.func_or_class._report(router), 5))
    assert [(s["draining"], s["in_flight"]) for s in sent] == [(False, 1), (False, 1), (True, 1), (True, 0)]
    assert relay.draining
