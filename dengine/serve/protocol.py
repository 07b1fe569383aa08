"""The OpenAI-compatible wire format, as msgspec Structs: requests are decoded strictly (wrong types,
unknown fields and out-of-range values are errors) before anything reaches the engine.

Diffusion options ride along as extra body fields (the `extra_body` of OpenAI's Python client):
gen_length, block_length, steps, threshold, factor, remasking (or Dream's name `alg`), alg_temp, sigma,
cfg_scale, stop_at_eos, cache_policy, cache_config, `tau` / `k` as shorthands for the EntropyCache
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

from dengine.outputs import RequestMetrics, RequestOutput
from dengine.sampling_params import SamplingParams
from dengine.trace import Trace


SERVER_STOPS_AT_EOS = True  # a request that does not send stop_at_eos finishes when its answer is fixed


class RequestError(ValueError):
    """A request the server refuses: becomes an HTTP error in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


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
    stop: str | list[str] | None = None  # refused unless empty: a diffusion canvas is decoded as a whole
    user: str | None = None
    # diffusion extras
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    threshold: float | None = None
    factor: float | None = None
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
        if self.n != 1:
            raise RequestError("only n=1 is supported", param="n")
        if self.trace and self.stream:
            raise RequestError("trace comes with the whole response: it needs stream false", param="trace")
        if self.stop:
            raise RequestError("stop strings are not supported (the model ends its answer with EOS)", param="stop")
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
        changes["stop_at_eos"] = SERVER_STOPS_AT_EOS if self.stop_at_eos is None else self.stop_at_eos
        for name in ("block_length", "steps", "temperature", "top_p", "top_k", "seed", "threshold", "factor",
                     "alg_temp", "sigma", "cfg_scale", "cache_policy", "trace"):
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
    prompt: str | list[int]


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(DiffusionFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]


# -- responses ------------------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class _Response(msgspec.Struct, kw_only=True):
    """What every response and stream chunk carries; `dengine` is how the request was decoded; `warning` (in a
    whole response, or a stream's last chunk) says when the answer cannot mean anything (an embedded model asked
    something other than its task)."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    dengine: RequestMetrics | None = None
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


class ChatDeltaChoice(msgspec.Struct):
    index: int
    delta: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


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
    """The HTTP response of a refused request: OpenAI's error body with the error's status."""
    return Response(error_body(error), status_code=error.status, media_type="application/json", headers=headers)


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


def usage(output: RequestOutput, stop_ids: set[int]) -> Usage:
    """Completion tokens are the answer's: generated tokens before the first EOS / end of turn."""
    answer = next((i for i, token in enumerate(output.token_ids) if token in stop_ids), len(output.token_ids))
    return Usage(len(output.prompt_token_ids), answer, len(output.prompt_token_ids) + answer)
