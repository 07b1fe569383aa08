"""LLMEngine: requests in, one ragged forward per step, outputs out. The async server drives it."""

from __future__ import annotations

import ctypes
import itertools
import logging
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

from dengine.attention import select_backend
from dengine.kv.kv_cache import PagedKVCache, plan_kv_pool
from dengine.kv.manager import KVCacheManager
from dengine.scheduler.policies import make_policy, policy_class
from dengine.model_runner import ModelRunner
from dengine.models.layers import enable_fusion, prepack_if_supported
from dengine.models.loader import load_model
from dengine.outputs import RequestMetrics, RequestOutput
from dengine.sampling_params import SamplingParams
from dengine.scheduler.scheduler import Scheduler
from dengine.scheduler.sequence import Sequence, SequenceStatus
from dengine.tokenizer import check_tokenizer_matches, end_of_turn_id, load_tokenizer

logger = logging.getLogger(__name__)

# A prompt is text, or a dict with "prompt_token_ids" (as in vLLM) or "prompt".
PromptType = str | dict[str, Any]


class PromptError(ValueError):
    """The prompt itself is refused: empty, not this vocabulary's tokens, or too long for the model."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD = -1, -3, 32 << 20


def keep_freed_memory() -> bool:
    """glibc only, process-wide: serve a step's large temporaries (up to 32 MiB) from the heap and keep freed heap
    memory, instead of mapping fresh pages for each of them (zeroed by page faults on first touch, unmapped on
    free) whenever glibc's adaptive threshold is low. Measured on the 2-core CPU: 16 full recomputes of
    llada-reverse 134-136 ms per step instead of 173-205 ms. Weights and the KV pool stay mapped. False where
    there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_openmp_threads() -> bool:
    """Stop the OpenMP worker threads this thread started (GNU OpenMP only, the runtime of torch's CPU wheels).

    Each thread that runs parallel torch ops owns a team of OpenMP workers for as long as it lives. GNU OpenMP
    lets its workers spin between parallel regions only while it manages no more threads than there are
    CPUs; beyond that they sleep after about a hundred spins, and every parallel region then waits for
    them to wake. A model loaded on one thread and stepped on another therefore ran each step about twice
    as slowly on 2 cores with 2 threads (llada-reverse, EntropyCache: 0.94-1.1 s against 0.40 s a request),
    until the loading thread released its team (0.42 s). Call it on a thread that has finished its torch
    work; a later parallel op starts a fresh team. False where the runtime is not GNU OpenMP."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        return pause(1) == 0  # omp_pause_soft: the calling thread's idle team exits
    return False


# With compile=True, steps of at least this many rows run compiled elementwise steps (measured: slower at one
# sequence's 179 rows, faster at 16 x 179 on a 2-core CPU).
FUSION_MIN_ROWS = 1024


class LLMEngine:
    """Owns the model, tokenizer, KV pool, scheduler and runner; steps all running requests at once."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        cache_policy: str = "none",
        cache_config: dict[str, Any] | None = None,
        kv_cache_memory: int | float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 16384,
        block_size: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        skip_tokenizer_init: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backend = select_backend(self.device, attention_backend)
        # None: the backend's (flash-attn reads the paged cache in place only in pages of a multiple of 256 tokens)
        block_size = backend.default_block_size if block_size is None else block_size
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        policy_class(cache_policy).parse_options(cache_config)
        # Process-wide: inductor fuses the layers' elementwise steps of large steps (first one compiles).
        enable_fusion(FUSION_MIN_ROWS if compile else None)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model_path = Path(model)
        self.model = load_model(self.model_path, dtype=dtype, device=self.device)
        self.config = self.model.config
        self.prepacked = prepack_if_supported(self.model)
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(self.model_path)
        if self.tokenizer is not None:
            check_tokenizer_matches(self.config, self.tokenizer, self.model_path)
        self.eot_token_id = end_of_turn_id(self.tokenizer)
        self.cache_policy = cache_policy
        self.cache_config = cache_config
        self.seed = seed

        dtype_ = next(self.model.parameters()).dtype
        plan = plan_kv_pool(self.config, block_size, dtype_, self.device, max_num_seqs=max_num_seqs,
                            kv_cache_memory=kv_cache_memory,
                            layer_outputs=policy_class(cache_policy).stores_layer_outputs)
        logger.info("KV pool: %d blocks of %d tokens, %.3f GB (%s)", plan.num_blocks, block_size, plan.bytes / 1e9,
                    plan.reason)
        num_blocks = plan.num_blocks
        self.kv_manager = KVCacheManager(
            num_blocks, block_size, PagedKVCache.outputs_per_block_for(self.config, block_size)
        )
        self.kv_cache = PagedKVCache(self.config, num_blocks, block_size, dtype_, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, backend)
        self.scheduler = Scheduler(self.kv_manager, max_num_seqs, max_num_batched_tokens)
        self._counter = itertools.count()
        self._ids: set[Hashable] = set()
        # Loading ran parallel ops on this thread: give its OpenMP team back, in case another thread steps the
        # engine (a server's step thread, a web worker); if this one does, its first step starts a fresh team.
        release_openmp_threads()

    # -- requests ---------------------------------------------------------------------------------

    def prompt_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Text and token ids of a prompt, validated against the model's vocabulary."""
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown or len(prompt) != 1:
                raise PromptError("a dict prompt needs exactly one of 'prompt' or 'prompt_token_ids'")
            if "prompt" in prompt:
                return self.prompt_token_ids(prompt["prompt"])
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise PromptError("prompt_token_ids must be a list of integers")
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise PromptError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
            text = None
            ids = list(ids)
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(
                    f"{self.model_path} has no tokenizer (or skip_tokenizer_init=True): "
                    "pass {'prompt_token_ids': [...]} instead of text"
                )
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            raise PromptError(f"a prompt is a string or a dict, got {type(prompt).__name__}")
        if not ids:
            raise PromptError("the prompt is empty")
        if all(i == self.config.mask_token_id for i in ids):
            raise PromptError("the prompt has no real token: it is only mask tokens")
        return text, ids

    def make_sequence(
        self, request_id: Hashable, prompt: PromptType, params: SamplingParams | None = None
    ) -> Sequence:
        """Validate a request completely and build its Sequence, without queuing anything."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.check_family(self.config.model_type)
        text, ids = self.prompt_token_ids(prompt)
        total = len(ids) + params.gen_length
        if total > self.config.max_position_embeddings:
            raise PromptError(
                f"prompt ({len(ids)} tokens) + gen_length ({params.gen_length}) = {total} exceeds the model's "
                f"maximum of {self.config.max_position_embeddings} positions", code="context_length_exceeded"
            )
        name = params.cache_policy or self.cache_policy
        if params.cache_config is not None:
            config = params.cache_config
        else:
            config = self.cache_config if name == self.cache_policy else None
        policy = make_policy(name, config)
        seed = params.seed if params.seed is not None else self.seed * 1_000_003 + next(self._counter)
        seq = Sequence(request_id, ids, params, self.config, policy, self.eot_token_id, seed, prompt=text)
        self.scheduler.check_admissible(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self._ids:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.scheduler.add(seq)
        self._ids.add(seq.request_id)

    def add_request(self, request_id: Hashable, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Validate and queue one request; raises ValueError (nothing queued) for bad input."""
        self.add_sequence(self.make_sequence(request_id, prompt, params))

    def abort_request(self, request_id: Hashable) -> RequestOutput | None:
        """Stop a request and free its KV blocks; returns its partial output, None if unknown."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self._ids.discard(request_id)
        seq.metrics.finished_time = time.perf_counter()
        return self.output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # -- stepping ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One ragged forward over every scheduled sequence; returns the requests finished by it."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        now = time.perf_counter()
        flat = [query for queries in out.queries for query in queries]
        logits = self.runner.run(flat)
        offset = 0
        for seq, queries in zip(out.sequences, out.queries):
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
            seq.apply(queries, logits[offset : offset + len(queries)])
            offset += len(queries)
        finished = self.scheduler.postprocess(out)
        for seq in finished:
            self._ids.discard(seq.request_id)
        return [self.output(seq) for seq in finished]

    # -- outputs ----------------------------------------------------------------------------------

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS and end of turn: an answer ends before the first of them."""
        return {self.config.eos_token_id, self.eot_token_id} - {None}

    def decode_text(self, token_ids: list[int]) -> str | None:
        """Text up to the first EOS / end-of-turn, special tokens skipped (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        stops = self.stop_token_ids
        end = next((i for i, token in enumerate(token_ids) if token in stops), len(token_ids))
        return self.tokenizer.decode(token_ids[:end], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        """One token's text, special tokens by name (None without a tokenizer)."""
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def output(self, seq: Sequence) -> RequestOutput:
        m = seq.metrics
        end = m.finished_time or time.perf_counter()
        steps = max(m.steps, 1)
        token_ids = seq.generated_token_ids()
        text = self.decode_text(token_ids)
        if seq.status is SequenceStatus.ABORTED:
            reason = "abort"
        else:
            reason = "eos" if seq.stopped_at is not None else "length"
        return RequestOutput(
            request_id=str(seq.request_id),
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=token_ids,
            text=text,
            finished=seq.status is SequenceStatus.FINISHED,
            finish_reason=reason,
            metrics=RequestMetrics(
                cache_policy=seq.policy.name,
                nfe=m.steps,
                full_recomputes=m.full_recomputes,
                full_recompute_rate=m.full_recomputes / steps,
                query_tokens=m.query_tokens,
                avg_query_tokens=m.query_tokens / steps,
                committed_tokens=m.committed_tokens,
                tokens_per_forward=m.committed_tokens / steps,
                latency_s=end - m.arrival_time,
                queue_s=(m.first_scheduled_time or end) - m.arrival_time,
                first_block_s=None if m.first_block_time is None else m.first_block_time - m.arrival_time,
                decision_seconds=m.decision_seconds,
                stopped_early=seq.stopped_at is not None,
            ),
            logprobs=None if seq.logprobs is None or reason == "abort" else seq.logprobs[: len(token_ids)],
            trace=None if seq.trace is None else seq.trace.build(
                seq, self.token_text, model=self.model_path.name, family=self.config.model_type,
                stop_token_ids=sorted(self.stop_token_ids), token_ids=token_ids, text=text),
        )
