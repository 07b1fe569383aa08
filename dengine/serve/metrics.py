"""Prometheus metrics of one replica: served at its `/metrics` (every sample labelled with the replica's
name), and mirrored to Ray's metrics export (ray.serve.metrics, tagged by replica) so a Prometheus scraping
Ray sees every replica. The async engine pushes fresh stats after aborts and when it goes idle, so the
gauges never keep the value of a request that is gone."""

from __future__ import annotations

import collections
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from dengine.async_engine import EngineStats

TOKENS_PER_SECOND_WINDOW_S = 30.0

_GAUGES = {
    "dengine_queue_length": "requests waiting for admission",
    "dengine_running_sequences": "sequences being decoded",
    "dengine_kv_cache_usage": "fraction of KV blocks in use",
    "dengine_full_recompute_rate": "full-recompute steps / steps, over finished requests",
    "dengine_tokens_per_second": f"generated tokens per second over the last {TOKENS_PER_SECOND_WINDOW_S:.0f} s",
}
_COUNTERS = {
    "dengine_generated_tokens": "generated tokens of finished requests",
    "dengine_forward_steps": "engine steps (one ragged forward each)",
    "dengine_aborted_requests": "requests ended before finishing (client gone, router dead, cut off at shutdown)",
}


class ServerMetrics:
    """Counters and gauges of one replica; `observe` refreshes the gauges from an EngineStats snapshot."""

    def __init__(self, model: str, replica: str = "local") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dengine_requests", "HTTP requests by endpoint and status",
                                ["model", "replica", "endpoint", "status"], registry=self.registry)
        self.gauges = {name: Gauge(name, text, ["model", "replica"], registry=self.registry)
                       for name, text in _GAUGES.items()}
        self.counters = {name: Counter(name, text, ["model", "replica"], registry=self.registry)
                         for name, text in _COUNTERS.items()}
        self.labels = (model, replica)
        self._finished: collections.deque[tuple[float, int]] = collections.deque()
        self._last = EngineStats(waiting=0, running=0, kv_blocks_used=0, kv_blocks_total=1, steps=0,
                                 generated_tokens=0, full_recomputes=0, finished_requests=0)
        self._recompute_steps = 0
        self._ray = _ray_metrics()

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(*self.labels, endpoint, str(status)).inc()
        if self._ray:
            self._ray["requests"].inc(tags={"endpoint": endpoint, "status": str(status)})

    def finished(self, tokens: int, steps: int) -> None:
        """A request finished with `tokens` generated over `steps` steps."""
        self._finished.append((time.monotonic(), tokens))
        self._recompute_steps += steps

    def observe(self, stats: EngineStats) -> None:
        now = time.monotonic()
        while self._finished and self._finished[0][0] < now - TOKENS_PER_SECOND_WINDOW_S:
            self._finished.popleft()
        values = {
            "dengine_queue_length": stats.waiting,
            "dengine_running_sequences": stats.running,
            "dengine_kv_cache_usage": stats.kv_blocks_used / max(stats.kv_blocks_total, 1),
            "dengine_full_recompute_rate": stats.full_recomputes / max(self._recompute_steps, 1),
            "dengine_tokens_per_second": sum(t for _, t in self._finished) / TOKENS_PER_SECOND_WINDOW_S,
        }
        increments = {
            "dengine_generated_tokens": stats.generated_tokens - self._last.generated_tokens,
            "dengine_forward_steps": stats.steps - self._last.steps,
            "dengine_aborted_requests": stats.aborted_requests - self._last.aborted_requests,
        }
        self._last = stats
        for name, value in values.items():
            self.gauges[name].labels(*self.labels).set(value)
            if self._ray:
                self._ray[name].set(value)
        for name, value in increments.items():
            if value > 0:
                self.counters[name].labels(*self.labels).inc(value)
                if self._ray:
                    self._ray[name].inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _ray_metrics() -> dict | None:
    """The same metrics as Ray Serve metrics when running inside a Serve replica, else None."""
    if "ray.serve" not in sys.modules:  # a replica has imported it; anything else has no Ray metrics
        return None
    try:
        from ray import serve
        from ray.serve import metrics

        serve.get_replica_context()
    except Exception:  # not in a replica (tests of the app without Ray, or Ray absent)
        return None
    out: dict = {"requests": metrics.Counter("dengine_requests", "HTTP requests", tag_keys=("endpoint", "status"))}
    out.update({name: metrics.Gauge(name, text) for name, text in _GAUGES.items()})
    out.update({name: metrics.Counter(name, text) for name, text in _COUNTERS.items()})
    return out
