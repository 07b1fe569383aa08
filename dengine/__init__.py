"""dengine: a serving engine for diffusion language models (LLaDA, Dream).

The public names load on first use (PEP 562), so a process that needs one light module (Serve's HTTP proxy
runs dengine/serve/proxy.py) does not import torch and transformers for it."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "CheckpointError": "dengine.config",
    "ModelConfig": "dengine.config",
    "LLMEngine": "dengine.engine",
    "PromptError": "dengine.engine",
    "LLM": "dengine.llm",
    "RequestMetrics": "dengine.outputs",
    "RequestOutput": "dengine.outputs",
    "SamplingParams": "dengine.sampling_params",
    "KVCacheManager": "dengine.kv",
    "PagedKVCache": "dengine.kv",
    "RequestTooLargeError": "dengine.kv",
    "ModelRunner": "dengine.model_runner",
    "SequenceQuery": "dengine.model_runner",
    "load_model": "dengine.models.loader",
    "read_model_config": "dengine.models.loader",
    "load_tokenizer": "dengine.tokenizer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'dengine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
