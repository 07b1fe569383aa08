"""The Ray Serve deployment: one AsyncLLMEngine per replica behind the OpenAI-compatible app.

    dengine serve --model llada-reverse --replicas 2 --num-cpus 1 --port 8000

Serve routes requests across replicas, restarts a replica that dies or fails its health check, and
propagates client disconnects as cancellation (which aborts the request and frees its KV blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ray import serve

from dengine.async_engine import AsyncLLMEngine
from dengine.sampling_params import SamplingParams
from dengine.serve.server import OpenAIServer, create_app


@serve.deployment(name="dengine", max_ongoing_requests=256, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class DengineServer:
    def __init__(self, model: str | None, engine_kwargs: dict[str, Any], defaults: dict[str, Any],
                 model_name: str, num_threads: int | None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.engine = AsyncLLMEngine.from_model(model, **engine_kwargs)
        self.server = OpenAIServer(self.engine, model_name, SamplingParams(**defaults))

    def __serve_build_asgi_app__(self):
        return create_app(self.server)

    def check_health(self) -> None:
        """Serve replaces a replica whose engine loop died."""
        if self.engine.loop_error is not None:
            raise RuntimeError(f"engine loop died: {self.engine.loop_error!r}")


def served_name(model: str | Path | None) -> str:
    from dengine.assets import DEFAULT_MODEL

    return DEFAULT_MODEL if model is None else Path(str(model)).name


def build_app(model: str | None = None, *, replicas: int = 1, num_cpus: float | None = None,
              num_gpus: float | None = None, model_name: str | None = None,
              defaults: dict[str, Any] | None = None, **engine_kwargs: Any):
    """The Serve application: `replicas` engines, each with num_cpus / num_gpus (one GPU each where there are)."""
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
    return DengineServer.options(num_replicas=replicas, ray_actor_options=options).bind(
        None if model is None else str(model), engine_kwargs, defaults, model_name or served_name(model), threads)
