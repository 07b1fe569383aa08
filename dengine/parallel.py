"""Offline data parallelism: N LLMEngine replicas as Ray actors (one GPU each where there are GPUs).

`LLM(model, data_parallel_size=N)` validates every prompt on every replica before any decoding starts,
gives each request the seed one engine would have given it (so the outputs equal a single replica's),
splits the prompts into contiguous shards, and returns the outputs in prompt order.
"""

from __future__ import annotations

from typing import Any

import torch

from dengine.engine import LLMEngine
from dengine.outputs import RequestOutput
from dengine.sampling_params import SamplingParams



class EngineWorker:
    """One replica: an LLMEngine in a Ray actor."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], num_threads: int | None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.engine = LLMEngine(model, **engine_kwargs)

    def validate(self, items: list[tuple[int, Any, SamplingParams | None]]) -> tuple[int, str] | None:
        """(index, message) of the first invalid request, or None; queues nothing."""
        for index, prompt, params in items:
            try:
                self.engine.make_sequence(f"check-{index}", prompt, params)
            except ValueError as exc:
                return index, str(exc)
        return None

    def generate(self, items: list[tuple[int, Any, SamplingParams | None]]) -> list[RequestOutput]:
        engine = self.engine
        sequences = [engine.make_sequence(f"dp-{index}", prompt, params) for index, prompt, params in items]
        order = {seq.request_id: i for i, seq in enumerate(sequences)}
        results: list[RequestOutput | None] = [None] * len(sequences)
        try:
            for seq in sequences:
                engine.add_sequence(seq)
            while any(r is None for r in results):
                for output in engine.step():
                    results[order[output.request_id]] = output
        except BaseException:
            for seq in sequences:
                engine.abort_request(seq.request_id)
            raise
        return results  # type: ignore[return-value]


class DataParallelEngines:
    """N EngineWorker actors; generate() shards, runs and reassembles."""

    def __init__(self, model: str, size: int, engine_kwargs: dict[str, Any]) -> None:
        import ray

        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {size!r}")
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        gpus = torch.cuda.is_available() and engine_kwargs.get("device") in (None, "cuda")
        cpus = 0.0 if gpus else ray.cluster_resources().get("CPU", 1.0) / size  # an equal share, maybe fractional
        threads = None if gpus else max(1, int(cpus))
        actor = ray.remote(EngineWorker).options(num_gpus=1 if gpus else 0, num_cpus=cpus)
        self.size = size
        self.seed = engine_kwargs.get("seed", 0)
        self.chunk = engine_kwargs.get("max_num_seqs", 64)  # prompts per remote call (and progress update)
        self.workers = [actor.remote(model, engine_kwargs, threads) for _ in range(size)]
        self._counter = 0

    def seeded(self, params: list[SamplingParams | None]) -> list[SamplingParams]:
        """Each request's params with the seed a single engine would have drawn for it."""
        out = []
        for p in params:
            p = p or SamplingParams()
            if p.seed is None:
                p = p.replace(seed=self.seed * 1_000_003 + self._counter)
                self._counter += 1
            out.append(p)
        return out

    def generate(self, prompts: list[Any], params: list[SamplingParams | None], bar) -> list[RequestOutput]:
        import ray

        items = list(zip(range(len(prompts)), prompts, params))
        shard = -(-len(items) // self.size)
        shards = [items[i * shard : (i + 1) * shard] for i in range(self.size)]
        for problem in ray.get([w.validate.remote(s) for w, s in zip(self.workers, shards)]):
            if problem is not None:
                raise ValueError(f"prompt {problem[0]}: {problem[1]}")
        items = [(i, prompt, p) for (i, prompt, _), p in zip(items, self.seeded(params))]
        shards = [items[i * shard : (i + 1) * shard] for i in range(self.size)]
        pending = {}
        for worker, work in zip(self.workers, shards):
            for start in range(0, len(work), self.chunk):
                pending[worker.generate.remote(work[start : start + self.chunk])] = work[start : start + self.chunk]
        results: list[RequestOutput | None] = [None] * len(items)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                chunk = pending.pop(ref)
                for (index, _, _), output in zip(chunk, ray.get(ref)):
                    results[index] = output
                bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
