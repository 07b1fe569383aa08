"""The OpenAI-compatible wire format, as msgspec Structs: requests are decoded strictly (wrong types,
unknown fields and out-of-range values are errors) before anything reaches the engine.

OpenAI's fields are honoured where a diffusion model can (n, logprobs, stop strings, echo, text content parts,
max_completion_tokens, vLLM's ignore_eos) and otherwise accepted at their defaults and refused with a reason
at any other value (UNSUPPORTED; docs/serving.md has the table).

Diffusion options ride along as extra body fields (the `extra_body` of OpenAI's Python client):
gen_length, block_length, steps, threshold, factor, tokens_per_step, softmax_dtype, remasking (or Dream's name
`alg`), alg_temp, sigma, cfg_scale, stop_at_eos, cache_policy, cache_config, `tau` / `k` as shorthands for the EntropyCache
options, and `trace` (the response then carries every denoising step; not with `stream`). OpenAI's
`max_tokens` is the generation length: a diffusion model decodes a canvas of that many positions, so
`max_tokens` and `gen_length` are the same field and giving both with different values is an error. It is a
cap, not a cost: the server finishes a request as soon as its answer is fixed (an EOS committed with every
position before it committed), unless the request sends `stop_at_eos: false`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

import msgspec
from starlette.responses import Response

from dengine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from dengine.sampling_params import MAX_LOGPROBS, MAX_SEED, SamplingParams
from dengine.trace import Trace


MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 128  # OpenAI's limit on n
# OpenAI request fields a diffusion model cannot honour: (field, why); refused at any value but the field's default
PENALTY = "penalties depend on the order tokens are generated in; a diffusion canvas commits them in any order"
NO_TOOLS = "the embedded and supported models have no tool-calling template"
UNSUPPORTED = (
    ("presence_penalty", PENALTY),
    ("frequency_penalty", PENALTY),
    ("logit_bias", "not implemented for diffusion sampling"),
    ("best_of", "it ranks answers by their likelihood as a left-to-right sequence, which a diffusion model's "
                "commit order does not give (n returns every answer)"),
    ("suffix", "the model has no infilling template"),
    ("tools", NO_TOOLS),
    ("tool_choice", NO_TOOLS),
    ("parallel_tool_calls", NO_TOOLS),
    ("functions", NO_TOOLS),
    ("function_call", NO_TOOLS),
    ("response_format", "structured output is not implemented"),
    ("service_tier", "one tier"),
    ("reasoning_effort", "not a reasoning model"),
    ("verbosity", "not a reasoning model"),
    ("audio", "a text model: text output only"),
    ("prediction", "predicted outputs are not implemented"),
    ("web_search_options", "no web search"),
)
SERVER_STOPS_AT_EOS = True  # a request that does not send stop_at_eos finishes when its answer is fixed


class RequestError(ValueError):
    """A request the server refuses: becomes an HTTP error in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.retry_after_s = retry_after_s  # a 503's Retry-After: when sending it again may succeed


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every event carries the usage so far (guidellm sends it)
    include_obfuscation: bool | None = None  # OpenAI's padding of stream events against side channels: none here


class DiffusionFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints share: OpenAI's sampling fields and the diffusion extras."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None  # the text is cut at the first stop string (finish_reason "stop")
    user: str | None = None
    # OpenAI fields a diffusion model cannot honour: accepted at their defaults, refused otherwise (UNSUPPORTED)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions that load testers send
    ignore_eos: bool = False  # decode and count the whole max_tokens canvas, as if EOS ended nothing
    min_tokens: int = 0
    # diffusion extras
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    threshold: float | None = None
    factor: float | None = None
    tokens_per_step: int | None = None  # exactly this many commits a step (Dream's exact one-token rule: 1)
    softmax_dtype: str | None = None  # LLaDA: "float32" as the official samplers, "float64" (default)
    remasking: str | None = None
    alg: str | None = None
    alg_temp: float | None = None
    sigma: float | None = None
    cfg_scale: float | None = None
    stop_at_eos: bool | None = None
    cache_policy: str | None = None
    cache_config: dict[str, Any] | None = None
    tau: float | None = None
    k: int | None = None
    trace: bool = False  # the response carries every step (dengine.trace.Trace); not with stream

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        """The request's SamplingParams over the server's defaults; RequestError naming the field if invalid."""
        if self.trace and self.stream:
            raise RequestError("trace comes with the whole response: it needs stream false", param="trace")
        if not 1 <= self.n <= MAX_CHOICES:
            raise RequestError(f"n must be 1 to {MAX_CHOICES}, got {self.n}", param="n")
        if self.trace and self.n > 1:
            raise RequestError("trace records one answer: it needs n 1", param="trace")
        wanted = self.logprobs_wanted()
        if wanted is not None and not 0 <= wanted <= MAX_LOGPROBS:
            raise RequestError(f"{self.logprobs_param} must be 0 to {MAX_LOGPROBS}, got {wanted}", param=self.logprobs_param)
        unset = {field.name: field.default for field in msgspec.structs.fields(self)}
        for name, why in UNSUPPORTED:
            if name in unset and getattr(self, name) != unset[name]:
                raise RequestError(f"{name} is not supported: {why}", param=name)
        if len(self.stop_strings) > MAX_STOP_STRINGS or not all(self.stop_strings):
            raise RequestError(f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        if self.ignore_eos and self.stop_at_eos:
            raise RequestError("ignore_eos decodes the whole canvas; it contradicts stop_at_eos true", param="ignore_eos")
        if self.max_tokens is not None and self.gen_length is not None and self.max_tokens != self.gen_length:
            raise RequestError("max_tokens and gen_length are the same field; they disagree", param="max_tokens")
        if self.remasking is not None and self.alg is not None and self.remasking != self.alg:
            raise RequestError("remasking and alg are the same field; they disagree", param="alg")
        changes: dict[str, Any] = {}
        gen_length = self.gen_length if self.gen_length is not None else self.max_tokens
        if gen_length is not None:
            changes["gen_length"] = gen_length
            if self.block_length is None and defaults.block_length is not None and gen_length % defaults.block_length:
                changes["block_length"] = None  # the default block does not divide it: one block
            if self.steps is None and defaults.steps is not None:
                changes["steps"] = None
        # max_tokens is a cap to an OpenAI client: stop once the answer is fixed unless the request says otherwise
        stop_at_eos = SERVER_STOPS_AT_EOS if self.stop_at_eos is None else self.stop_at_eos
        changes["stop_at_eos"] = stop_at_eos and not self.ignore_eos
        changes["logprobs"] = wanted
        if self.min_tokens:
            changes["min_tokens"] = self.min_tokens
        for name in ("block_length", "steps", "temperature", "top_p", "top_k", "seed", "threshold", "factor",
                     "tokens_per_step", "softmax_dtype", "alg_temp", "sigma", "cfg_scale", "cache_policy", "trace"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        remasking = self.remasking or self.alg
        if remasking is not None:
            changes["remasking"] = remasking
        cache_config = dict(self.cache_config or {})
        for name in ("tau", "k"):
            value = getattr(self, name)
            if value is not None:
                if name in cache_config and cache_config[name] != value:
                    raise RequestError(f"{name} is given twice (in cache_config too) with different values", param=name)
                cache_config[name] = value
        if cache_config:
            changes["cache_config"] = cache_config
        try:
            return defaults.replace(**changes)
        except (ValueError, TypeError) as exc:
            raise self.field_error(str(exc)) from None

    def logprobs_wanted(self) -> int | None:
        """SamplingParams.logprobs: how many alternatives per token (None: no logprobs)."""
        return None

    logprobs_param = "logprobs"

    def choice_seeds(self, seed: int | None, prompts: int = 1) -> list[int | None]:
        """The seed of each answer (n per prompt): the request's seed, then the next ones (None: the engine's)."""
        return [None if seed is None else (seed + i) % (MAX_SEED + 1) for i in range(self.n * prompts)]

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def field_error(self, message: str) -> RequestError:
        """A SamplingParams error in the request's own words: named after the field the client sent (max_tokens
        rather than gen_length, alg rather than remasking), that field as the error's param."""
        field = message.split(" ", 1)[0]
        sent_as = {"gen_length": "gen_length" if self.gen_length is not None else "max_tokens",
                   "remasking": "alg" if self.remasking is None and self.alg is not None else "remasking"}
        name = sent_as.get(field, field)
        if name not in self.__struct_fields__:
            return RequestError(message)
        return RequestError(name + message[len(field):], param=name)


class CompletionRequest(DiffusionFields, kw_only=True, forbid_unknown_fields=True):
    # a text, token ids, or a batch of either (OpenAI's four forms; lm-eval sends batches)
    prompt: str | list[str | int | list[int]]
    echo: bool = False  # the prompt's text before the completion's (the first event of a stream)
    logprobs: int | None = None  # alternatives per generated token
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts (one unless a batch), each a text or token ids; RequestError for a mixed or empty batch."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        kinds = {type(item) for item in self.prompt}
        if kinds == {int}:
            return [self.prompt]
        if len(kinds) != 1 or not self.prompt:
            raise RequestError("prompt is a text, token ids, or a non-empty list of texts or of token-id lists "
                               "(not a mix)", param="prompt")
        return list(self.prompt)

    def logprobs_wanted(self) -> int | None:
        if self.echo and self.logprobs is not None:
            raise RequestError("logprobs of the echoed prompt are not defined for a diffusion model: it scores "
                               "no text token by token left to right (loglikelihood evaluations need an "
                               "autoregressive model); echo and logprobs each work alone", param="logprobs")
        return self.logprobs


class TextPart(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="text"):
    """OpenAI's content part form ({"type": "text", "text": ...}); the only kind a text model takes."""

    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string: text parts joined, as OpenAI's own models read them."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role  # OpenAI's newer name for the system role


class ChatCompletionRequest(DiffusionFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's current name for max_tokens in chat
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per generated token, with logprobs
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None  # accepted and ignored, like user (prefix caching is per request here)
    safety_identifier: str | None = None
    modalities: list[str] | None = None  # only ["text"]
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools
    function_call: str | dict[str, Any] | None = None

    logprobs_param = "top_logprobs"

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        if self.modalities not in (None, ["text"]):
            raise RequestError("modalities other than [\"text\"] are not supported: a text model", param="modalities")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise RequestError("max_tokens and max_completion_tokens are the same field; they disagree",
                                   param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(defaults)


# -- responses ------------------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    """OpenAI's legacy logprobs object: per generated token, its text, logprob, alternatives and offset."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token's text starts in the choice's text


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]
    refusal: None = None


class _Response(msgspec.Struct, kw_only=True):
    """What every response and stream chunk carries; `dengine` is how the request was decoded; `warning` (in a
    whole response, or a stream's last chunk) says when the answer cannot mean anything (an embedded model asked
    something other than its task)."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    dengine: RequestMetrics | list[RequestMetrics] | None = None  # a list, one per choice, when n > 1
    warning: str | None = None


class CompletionResponse(_Response, kw_only=True):
    object: str = "text_completion"
    choices: list[CompletionChoice]
    trace: Trace | None = None


class ChatMessageOut(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatDeltaChoice(msgspec.Struct):
    index: int
    delta: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response, kw_only=True):
    object: str = "chat.completion"
    choices: list[ChatChoice]
    trace: Trace | None = None


class ChatCompletionChunk(_Response, kw_only=True):
    object: str = "chat.completion.chunk"
    choices: list[ChatDeltaChoice]


class ModelCard(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "dengine"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


def error_body(error: RequestError) -> bytes:
    return msgspec.json.encode(ErrorResponse(ErrorBody(str(error), error.kind, error.param, error.code)))


def error_response(error: RequestError, headers: dict[str, str] | None = None) -> Response:
    """The HTTP response of a refused request: OpenAI's error body with the error's status (and Retry-After when
    the error says when to retry; OpenAI's client waits that long before its own retry)."""
    if error.retry_after_s is not None:
        headers = {**(headers or {}), "Retry-After": str(error.retry_after_s)}
    return Response(error_body(error), status_code=error.status, media_type="application/json", headers=headers)


RETRY_AFTER_S = 5  # what a 503 tells clients to wait: about a replica's restart, or a few blocks of decoding


def unavailable(message: str, code: str) -> RequestError:
    """A retryable refusal (503 with Retry-After): shutting down, no replica, the host short of memory."""
    return RequestError(message, status=503, kind="server_error", code=code, retry_after_s=RETRY_AFTER_S)


def body_too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than this server's limit of {limit} bytes", status=413,
                        code="request_too_large")


def error_event(error: RequestError) -> bytes:
    """A server-sent event carrying an error in OpenAI's shape (a stream that cannot go on ends with it)."""
    return b"data: " + error_body(error) + b"\n\n"


def decode_request(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Strictly decode a request body; RequestError (400) for malformed JSON, wrong types, unknown fields."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError(str(exc), param=_field_at_fault(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply") from None


def _field_at_fault(message: str) -> str | None:
    """The top-level field a msgspec error is about: its path (`- at `$.max_tokens``), else the field it names
    (`Object contains unknown field `bogus``, `Object missing required field `prompt``)."""
    path = message.rsplit("at `$.", 1)
    if len(path) == 2:
        return path[1].rstrip("`").split("[")[0].split(".")[0]
    named = re.search(r"field `([^`]+)`$", message)
    return named.group(1) if named else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def response_id(endpoint: str) -> str:
    """A new id for a response of `endpoint` ("completions" or "chat_completions"), as OpenAI prefixes them."""
    return new_id("cmpl" if endpoint == "completions" else "chatcmpl")


def now() -> int:
    return int(time.time())


def finish_reason(output: RequestOutput, stop_ids: set[int]) -> str:
    """OpenAI's reason: "stop" when the model ended its answer (EOS / end of turn), else "length"."""
    if output.finish_reason == "abort":
        return "abort"
    return "stop" if any(token in stop_ids for token in output.token_ids) else "length"


def total_usage(usages: list[Usage], n: int) -> Usage:
    """The usage of a request's answers, n per prompt in order: each prompt counted once."""
    prompt = sum(u.prompt_tokens for u in usages[::n])
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt, completion, prompt + completion)


def usage(output: RequestOutput, stop_ids: set[int]) -> Usage:
    """Completion tokens are the answer's: generated tokens before the first EOS / end of turn."""
    answer = next((i for i, token in enumerate(output.token_ids) if token in stop_ids), len(output.token_ids))
    return Usage(len(output.prompt_token_ids), answer, len(output.prompt_token_ids) + answer)


class Answer:
    """What the client gets of one answer: the text cut at the first stop string (held back while it may still
    begin one, for streams), the logprobs of the answer's tokens (each sent with the text that holds it), the
    finish reason and the usage (so far, for streams), with ignore_eos honoured."""

    def __init__(self, request: DiffusionFields, stop_ids: set[int], tokenizer) -> None:
        self.stops = request.stop_strings
        self.hold = max((len(stop) for stop in self.stops), default=1) - 1
        self.ignore_eos = request.ignore_eos
        self.stop_ids, self.tokenizer = stop_ids, tokenizer
        self.pending, self.emitted, self.stopped, self.final = "", "", False, False
        # logprobs of the answer's tokens not sent yet, each with its text
        self.queued: list[tuple[TokenLogprob, str]] = []
        self.logprob_chars = 0  # where the next token whose logprob is sent starts in the answer
        self.ended = False  # the answer's EOS has arrived: the tokens after it are not the answer's
        self.prompt_tokens = self.tokens = 0  # the answer's tokens decoded so far

    def feed(self, text: str, token_ids: list[int] = (), logprobs: list[TokenLogprob] | None = None,
             prompt_tokens: int = 0) -> str:
        """The part of text (arriving block by block, with its tokens and their logprobs) that can be sent now."""
        self.prompt_tokens = prompt_tokens
        if not self.ended:
            end = len(token_ids)
            if not self.ignore_eos:
                end = next((i for i, token in enumerate(token_ids) if token in self.stop_ids), end)
                self.ended = end < len(token_ids)
            self.tokens += end
            for entry in (logprobs or [])[:end]:
                self.queued.append((entry, "" if self.tokenizer is None else self.tokenizer.decode([entry.token_id])))
        if self.stopped:
            return ""
        self.pending += text
        cuts = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            out, self.pending, self.stopped = self.pending[: min(cuts)], "", True
        else:
            keep = min(self.hold, len(self.pending))
            out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        self.emitted += out
        return out

    def flush(self) -> str:
        """What was held back, once the output is final."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        self.emitted += out
        self.final = True
        return out

    def whole(self, output: RequestOutput) -> str:
        return self.feed(output.text or "", output.token_ids, output.logprobs, len(output.prompt_token_ids)) + self.flush()

    def usage_so_far(self) -> Usage:
        return Usage(self.prompt_tokens, self.tokens, self.prompt_tokens + self.tokens)

    def logprobs(self) -> list[tuple[TokenLogprob, str, int]]:
        """The answer's tokens whose text has been sent and whose logprobs have not, with their text and where
        it starts in the answer: all of them once final, and with a stop string those up to the cut."""
        ready = []
        while self.queued:
            entry, text = self.queued[0]
            start, end = self.logprob_chars, self.logprob_chars + len(text)
            if self.stopped:
                if start >= len(self.emitted):
                    self.queued.clear()
                    break
            elif not self.final and end > len(self.emitted):
                break
            ready.append((entry, text, start))
            self.queued.pop(0)
            self.logprob_chars = end
        return ready

    def finish_reason(self, output: RequestOutput) -> str:
        if output.finish_reason != "abort" and self.stopped:
            return "stop"
        if output.finish_reason != "abort" and self.ignore_eos:
            return "length"
        return finish_reason(output, self.stop_ids)

    def usage(self, output: RequestOutput) -> Usage:
        """ignore_eos counts the whole canvas; a stop string counts the tokens of the text sent (re-tokenized)."""
        prompt = len(output.prompt_token_ids)
        if self.ignore_eos:
            completion = len(output.token_ids)
        elif self.stopped and self.tokenizer is not None:
            completion = len(self.tokenizer.encode(self.emitted, add_special_tokens=False))
        else:
            return usage(output, self.stop_ids)
        return Usage(prompt, completion, prompt + completion)


def completion_logprobs(tokens: list[tuple[TokenLogprob, str, int]], offset: int, token_text) -> CompletionLogprobs | None:
    """OpenAI's completions logprobs of tokens (Answer.logprobs), text offsets shifted by offset (an echo)."""
    if not tokens:
        return None
    return CompletionLogprobs(
        tokens=[text for _, text, _ in tokens],
        token_logprobs=[entry.logprob for entry, _, _ in tokens],
        # as OpenAI's: the top alternatives and the sampled token (up to logprobs + 1 entries)
        top_logprobs=[{text: entry.logprob, **{token_text(t): lp for t, lp in reversed(entry.top)}}
                      for entry, text, _ in tokens],
        text_offset=[offset + start for _, _, start in tokens],
    )


def chat_logprobs(tokens: list[tuple[TokenLogprob, str, int]], token_text) -> ChatLogprobs | None:
    """OpenAI's chat logprobs of tokens (Answer.logprobs)."""
    if not tokens:
        return None

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(token_id)
        return TopLogprob(text, logprob, list(text.encode()))

    return ChatLogprobs([
        ChatTokenLogprob(text, entry.logprob, list(text.encode()), [top(t, lp) for t, lp in entry.top])
        for entry, text, _ in tokens
    ])
