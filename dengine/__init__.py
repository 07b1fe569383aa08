"""dengine: a serving engine for diffusion language models (LLaDA, Dream)."""

from dengine.config import CheckpointError, ModelConfig
from dengine.kv import KVCacheManager, PagedKVCache, RequestTooLargeError
from dengine.model_runner import ModelRunner, SequenceQuery
from dengine.models.loader import load_model, read_model_config
from dengine.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "KVCacheManager",
    "ModelConfig",
    "ModelRunner",
    "PagedKVCache",
    "RequestTooLargeError",
    "SequenceQuery",
    "load_model",
    "load_tokenizer",
    "read_model_config",
]
