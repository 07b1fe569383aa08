"""The offline API: LLM(model=...).generate(prompts) and .chat(conversations)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dengine.assets import resolve_model
from dengine.engine import LLMEngine, PromptType
from dengine.outputs import RequestOutput
from dengine.sampling_params import SamplingParams
from dengine.tokenizer import load_tokenizer

Message = dict[str, str]


def chat_prompt(tokenizer, conversation: list[Message]) -> dict[str, list[int]]:
    """A conversation as the prompt the model answers: its chat template with the assistant turn opened."""
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


class LLM:
    """A thin layer over LLMEngine: submit a batch, step until done, return outputs in order."""

    def __init__(self, model: str | Path | None = None, data_parallel_size: int = 1, **engine_kwargs: Any) -> None:
        """model: a local checkpoint folder, or an embedded model's name; None is the default embedded model.

        data_parallel_size > 1 runs that many engine replicas as Ray actors (one GPU each where there are
        GPUs, else an equal share of the CPUs) and spreads the prompts across them; outputs equal a
        single engine's (same seeds) and come back in prompt order. Needs the `serve` extra (ray).
        """
        path = resolve_model(model)
        self.model_path = path
        self.data_parallel = None
        self.engine: LLMEngine | None = None
        if data_parallel_size == 1:
            self.engine = LLMEngine(path, **engine_kwargs)
            self.tokenizer = self.engine.tokenizer
        else:
            from dengine.parallel import DataParallelEngines

            self.data_parallel = DataParallelEngines(str(path), data_parallel_size, engine_kwargs)
            self.tokenizer = None if engine_kwargs.get("skip_tokenizer_init") else load_tokenizer(path)

    def get_tokenizer(self):
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the data-parallel replicas (a no-op for a single engine)."""
        if self.data_parallel is not None:
            self.data_parallel.shutdown()

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Decode every prompt; outputs come back in prompt order. Bad input raises before any work."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling_params for {len(prompts)} prompts")
        if self.data_parallel is not None:
            with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True) as bar:
                return self.data_parallel.generate(prompts, params_list, bar)
        batch = uuid.uuid4().hex[:8]
        sequences = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                sequences.append(self.engine.make_sequence(f"{batch}-{index}", prompt, params))
            except ValueError as exc:
                raise type(exc)(f"prompt {index}: {exc}") from None
        return self._run(sequences, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tokenizer = self.tokenizer
        if tokenizer is None or tokenizer.chat_template is None:
            raise ValueError(f"{self.model_path} has no tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for index, conversation in enumerate(conversations):
            if not conversation or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
                raise ValueError(f"conversation {index}: expected a non-empty list of {{'role', 'content'}} dicts")
            prompts.append(chat_prompt(tokenizer, conversation))
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, sequences: list, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        order = {seq.request_id: i for i, seq in enumerate(sequences)}
        results: list[RequestOutput | None] = [None] * len(sequences)
        policies = sorted({seq.policy.name + (f" {json.dumps(seq.params.cache_config, sort_keys=True)}"
                                              if seq.params.cache_config else "") for seq in sequences})
        label = f"generate [{policies[0] if len(policies) == 1 else 'mixed policies'}]"
        # Progress in generated positions: a step moves it by what it committed; a request that stops early
        # (stop_at_eos) counts its whole canvas once finished, so the bar ends at its total.
        total = sum(seq.params.gen_length for seq in sequences)
        bar = tqdm(total=total, desc=label, unit="tok", disable=not use_tqdm, dynamic_ncols=True)
        start, done_requests = time.perf_counter(), 0
        try:
            for seq in sequences:
                engine.add_sequence(seq)
            while done_requests < len(sequences):
                for output in engine.step():
                    index = order.get(output.request_id)
                    if index is not None:
                        results[index] = output
                        done_requests += 1
                if use_tqdm:
                    progress = sum(seq.params.gen_length if seq.is_finished else seq.metrics.committed_tokens
                                   for seq in sequences)
                    bar.update(progress - bar.n)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{done_requests}/{len(sequences)} requests, "
                                        f"{progress / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
        except BaseException:
            for seq in sequences:
                engine.abort_request(seq.request_id)
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]
