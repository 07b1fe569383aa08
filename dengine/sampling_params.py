"""SamplingParams: every decoding option of a request, validated once at construction."""

from __future__ import annotations

import math
from typing import Any

import msgspec

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGORITHMS = ("maskgit_plus", "topk_margin", "entropy", "origin")
# "low_confidence" (LLaDA's name) and "maskgit_plus" (Dream's) are the same rule: top-1 probability.
REMASKING = LLADA_REMASKING + DREAM_ALGORITHMS

# Options only one family's reference sampler has, with the value that means "not used".
DREAM_ONLY = {"top_p": None, "top_k": None, "alg_temp": None, "eps": None}
# Dream's official diffusion_generate filters every masked position's logits to the top 50 unless the caller
# sets top_k: its generation config inherits top_k = 50 from the model config (see docs/sampling.md).
DREAM_DEFAULT_TOP_K = 50
TOP_K_OFF = (0, -1)  # vLLM's convention: no top-k filter
# Bounds that keep one request's work and arithmetic sane: beyond them a value only wastes forwards or overflows.
MAX_TEMPERATURE = 100.0
MAX_CFG_SCALE = 100.0
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
LLADA_ONLY = {"cfg_scale": 0.0, "logits_eos_inf": False, "confidence_eos_eot_inf": False, "softmax_dtype": "float64"}
SOFTMAX_DTYPES = ("float64", "float32")


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How one request is decoded; see docs/sampling.md for every option's exact meaning."""

    gen_length: int = 128
    block_length: int | None = None  # None: one block of gen_length
    steps: int | None = None  # None: gen_length (one token per step); ignored by threshold/factor
    tokens_per_step: int | None = None  # commit exactly this many masks a step instead of the family's schedule
    temperature: float = 0.0
    top_p: float | None = None  # Dream
    top_k: int | None = None  # Dream; None: 50 (the official default), 0 or -1: no filter
    remasking: str = "low_confidence"
    alg: str | None = None  # Dream's name for remasking (as the server accepts it); folded into remasking
    alg_temp: float | None = None  # Dream: sample commit positions from softmax(confidence / alg_temp)
    eps: float | None = None  # Dream: final timestep (default 1e-3)
    threshold: float | None = None  # Fast-dLLM: commit every in-block mask with confidence >= threshold
    factor: float | None = None  # Fast-dLLM factor rule
    sigma: float | None = None  # certainty-prior decoding: rank by confidence * certainty density; None: the policy's
    cfg_scale: float = 0.0  # LLaDA classifier-free guidance
    logits_eos_inf: bool = False  # LLaDA: EOS can never be sampled
    confidence_eos_eot_inf: bool = False  # LLaDA: EOS / EOT never count as confident
    softmax_dtype: str = "float64"  # LLaDA: the confidences' softmax; "float32" as dLLM-Cache's and d2Cache's samplers
    stop_at_eos: bool = False
    min_tokens: int = 0  # EOS and end of turn cannot be committed at the first min_tokens generated positions
    seed: int | None = None
    cache_policy: str | None = None  # None: the engine's policy
    cache_config: dict[str, Any] | None = None
    trace: bool = False  # record every step in RequestOutput.trace (dengine.trace)
    logprobs: int | None = None  # RequestOutput.logprobs: each token's log-probability at its commit, and this many alternatives

    def __post_init__(self) -> None:
        if self.alg is not None:
            if self.remasking not in ("low_confidence", self.alg):
                raise ValueError(f"remasking {self.remasking!r} and alg {self.alg!r} are the same option; "
                                 "they disagree")
            self.remasking, self.alg = self.alg, None
        _check_int("gen_length", self.gen_length, minimum=1)
        block = self.gen_length if self.block_length is None else self.block_length
        _check_int("block_length", block, minimum=1)
        if self.gen_length % block:
            raise ValueError(f"gen_length {self.gen_length} is not a multiple of block_length {block}")
        steps = self.gen_length if self.steps is None else self.steps
        _check_int("steps", steps, minimum=1)
        if steps > self.gen_length:
            raise ValueError(f"steps {steps} exceeds gen_length {self.gen_length}: a step past one token per "
                             "step commits nothing")
        num_blocks = self.gen_length // block
        if steps % num_blocks:
            raise ValueError(f"steps {steps} is not divisible by the number of blocks {num_blocks}")
        _check_float("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, minimum=-1)
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking {self.remasking!r} is unknown; choose one of {list(REMASKING)}")
        if self.alg_temp is not None:
            _check_float("alg_temp", self.alg_temp, low=0.0)
        if self.eps is not None:
            _check_float("eps", self.eps, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold and factor are two parallel-decoding rules: set at most one")
        if self.threshold is not None:
            _check_float("threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        if self.factor is not None:
            _check_float("factor", self.factor, low=0.0, low_open=True)
        if self.remasking == "origin" and (self.threshold is not None or self.factor is not None):
            raise ValueError("remasking 'origin' commits at random and cannot use threshold or factor")
        if self.tokens_per_step is not None:
            _check_int("tokens_per_step", self.tokens_per_step, minimum=1)
            if self.steps is not None or self.parallel:
                raise ValueError("tokens_per_step fixes the commits per step: leave steps, threshold and factor unset")
            if self.remasking == "origin":
                raise ValueError("remasking 'origin' commits at random and cannot use tokens_per_step")
        if self.sigma is not None:
            _check_float("sigma", self.sigma, low=0.0, low_open=True)
            if self.remasking == "origin":
                raise ValueError("remasking 'origin' commits at random and has no confidence for sigma to weight")
        _check_float("cfg_scale", self.cfg_scale, low=0.0, high=MAX_CFG_SCALE)
        if self.softmax_dtype not in SOFTMAX_DTYPES:
            raise ValueError(f"softmax_dtype {self.softmax_dtype!r} is unknown; choose one of {list(SOFTMAX_DTYPES)}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        _check_int("min_tokens", self.min_tokens, minimum=0, maximum=self.gen_length)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)
        if self.cache_config is not None and not isinstance(self.cache_config, dict):
            raise ValueError(f"cache_config must be a dict of policy options, got {type(self.cache_config).__name__}")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed, validated like a new SamplingParams."""
        return SamplingParams(**{**{f: getattr(self, f) for f in self.__struct_fields__}, **changes})

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.resolved_block_length

    @property
    def resolved_block_length(self) -> int:
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def steps_per_block(self) -> int:
        return (self.gen_length if self.steps is None else self.steps) // self.num_blocks

    @property
    def parallel(self) -> bool:
        """Threshold or factor decoding: the number of steps is data dependent."""
        return self.threshold is not None or self.factor is not None

    @property
    def dream_top_k(self) -> int | None:
        """The top-k filter Dream's sampler applies: 50 unless set, None when turned off (0 or -1)."""
        if self.top_k is None:
            return DREAM_DEFAULT_TOP_K
        return None if self.top_k in TOP_K_OFF else self.top_k

    def check_family(self, model_type: str) -> None:
        """Reject options the model family's reference sampler does not have."""
        if model_type == "llada":
            if self.remasking in ("topk_margin", "entropy", "origin"):
                raise ValueError(f"remasking {self.remasking!r} is a Dream algorithm; LLaDA has {list(LLADA_REMASKING)}")
            foreign = DREAM_ONLY
        else:
            if self.remasking == "random":
                raise ValueError("remasking 'random' is LLaDA's; Dream has " + str(list(DREAM_ALGORITHMS)))
            foreign = LLADA_ONLY
        for name, unused in foreign.items():
            if getattr(self, name) != unused and not (name == "top_k" and self.top_k in TOP_K_OFF):
                other = "Dream" if model_type == "llada" else "LLaDA"
                raise ValueError(f"{name} is a {other}-only option and this model is {model_type}")


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
