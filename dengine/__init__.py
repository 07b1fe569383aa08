"""dengine: a serving engine for diffusion language models (LLaDA, Dream)."""

from dengine.config import CheckpointError, ModelConfig
from dengine.engine import LLMEngine, PromptError
from dengine.llm import LLM
from dengine.outputs import RequestMetrics, RequestOutput
from dengine.sampling_params import SamplingParams
from dengine.kv import KVCacheManager, PagedKVCache, RequestTooLargeError
from dengine.model_runner import ModelRunner, SequenceQuery
from dengine.models.loader import load_model, read_model_config
from dengine.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "KVCacheManager",
    "LLM",
    "LLMEngine",
    "ModelConfig",
    "ModelRunner",
    "PromptError",
    "PagedKVCache",
    "RequestMetrics",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
    "SequenceQuery",
    "load_model",
    "load_tokenizer",
    "read_model_config",
]
