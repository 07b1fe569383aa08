"""Would compiling the decoder layers make a step faster? The experiment behind docs/benchmarks.md 4b's
"levers measured and not taken", kept so that it can be re-run when torch or the machine changes.

    python benchmarks/compiled_layers.py --graph layer --weights plain
    python benchmarks/compiled_layers.py --graph stack --weights packed --cpp-wrapper

Two engines on llada-reverse in bf16 in one process: the engine as shipped (eager layers, prepacked weights)
and one whose one-shape steps (a lone request) run the layers through torch.compile (inductor, shapes
dynamic): one graph that every layer runs with its own weights (`--graph layer`), or one graph of the whole
layer stack (`--graph stack`); over the plain weights inductor sees (`--weights plain`), or the engine's
prepacked ones behind an opaque custom op (`--weights packed`). The engines alternate request by request
(digit reversal, gen 128, block 32, one token per step) with policy none (full steps) and EntropyCache
(mostly partial steps); prints the medians of ms per step, their ratio, how many answers were
token-identical, and the seconds the first (compiling) requests took. Nothing here is used by the engine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.fx.experimental._config as fx_config

from dengine.attention.torch_sdpa import math_attention
from dengine.llm import LLM, chat_prompt
from dengine.models.layers import PrepackedLinear, apply_rope, rms_norm, rope_cos_sin, silu_gate
from dengine.sampling_params import SamplingParams
from dengine.tasks import get_task

_PACKED: list[PrepackedLinear] = []


@torch.library.custom_op("dengine_bench::prepacked_linear", mutates_args=())
def prepacked_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _PACKED[handle](x)


@prepacked_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, PrepackedLinear):
        return prepacked_linear(x, module.handle, module.out_features)
    return module(x)


def layer_step(layer, x, cos, sin, slot_mapping, kv_slots, key_cache, value_cache):
    """One decoder layer over x [count, rows, hidden], the eager DecoderLayer's operations for a one-shape batch."""
    attn = layer.attn
    count, rows, _ = x.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h = rms_norm.fn(x, layer.attn_norm.weight, layer.attn_norm.eps)
    qkv = linear(attn.qkv_proj, h)
    qk = qkv[..., : attn.q_size + attn.kv_size].reshape(count, rows, heads + kv_heads, head_dim)
    q, k = apply_rope.fn(qk, cos, sin).split([heads, kv_heads], dim=2)
    v = qkv[..., attn.q_size + attn.kv_size :].reshape(count, rows, kv_heads, head_dim)
    flat_k, flat_v = key_cache.view(-1, kv_heads, head_dim), value_cache.view(-1, kv_heads, head_dim)
    flat_k.index_copy_(0, slot_mapping, k.reshape(-1, kv_heads, head_dim))
    flat_v.index_copy_(0, slot_mapping, v.reshape(-1, kv_heads, head_dim))
    keys, values = flat_k[kv_slots].transpose(1, 2), flat_v[kv_slots].transpose(1, 2)
    out = math_attention(q.transpose(1, 2), keys, values).transpose(1, 2).reshape(count, rows, attn.q_size)
    x = x + linear(attn.o_proj, out)
    h = rms_norm.fn(x, layer.mlp_norm.weight, layer.mlp_norm.eps)
    return x + linear(layer.mlp.down_proj, silu_gate.fn(linear(layer.mlp.gate_up_proj, h)))


def stack_step(layers, x, cos, sin, slot_mapping, kv_slots, keys, values):
    for layer, key_cache, value_cache in zip(layers, keys, values):
        x = layer_step(layer, x, cos, sin, slot_mapping, kv_slots, key_cache, value_cache)
    return x


def compiled_engine(graph: str, weights: str, cpp_wrapper: bool) -> LLM:
    """An LLM whose one-shape steps without layer reuse or probes run the compiled layers."""
    llm = LLM("llada-reverse", dtype="bfloat16", kv_cache_memory=1 << 28)
    model, kv = llm.engine.runner.model, llm.engine.kv_cache
    if weights == "plain":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, PrepackedLinear):
                    plain = torch.nn.Linear(child.in_features, child.out_features, bias=False, dtype=torch.bfloat16)
                    plain.weight, plain.bias = torch.nn.Parameter(child.weight, requires_grad=False), child.bias
                    setattr(parent, name, plain)
    for module in model.modules():
        if isinstance(module, PrepackedLinear):
            module.handle = len(_PACKED)
            _PACKED.append(module)
    fn: Any = torch.compile(layer_step if graph == "layer" else stack_step, dynamic=True,
                            options={"cpp_wrapper": cpp_wrapper})
    eager_forward, c = model.forward, model.config

    def forward(ctx, kv_cache):
        b = ctx.batch
        one_shape = len(set(b.query_lens)) == 1 and len(set(b.seq_lens)) == 1
        if ctx.layer_reuse is not None or ctx.probe is not None or not one_shape:
            return eager_forward(ctx, kv_cache)
        count, rows = len(b.query_lens), b.query_lens[0]
        x = model.embed(b.input_ids).view(count, rows, -1)
        cos, sin = (t.view(count, rows, 1, -1) for t in rope_cos_sin(
            b.positions, c.head_dim, c.rope_theta, torch.float32 if c.rope_in_fp32 else x.dtype))
        kv_slots = b.kv_slots.view(count, b.seq_lens[0])
        with fx_config.patch(use_duck_shape=False):  # rows == canvas in a full step: still one graph
            if graph == "layer":
                for i, layer in enumerate(model.layers):
                    x = fn(layer, x, cos, sin, b.slot_mapping, kv_slots, kv.key[i], kv.value[i])
            else:
                x = fn(model.layers, x, cos, sin, b.slot_mapping, kv_slots, kv.key, kv.value)
        x = x.view(count * rows, -1).index_select(0, b.logits_indices)
        return model.lm_head(model.final_norm(x))

    model.forward = forward
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", choices=["layer", "stack"], default="layer")
    parser.add_argument("--weights", choices=["plain", "packed"], default="plain")
    parser.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (no Python per kernel)")
    parser.add_argument("--requests", type=int, default=8, help="requests per policy and engine")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eager = LLM("llada-reverse", dtype="bfloat16", kv_cache_memory=1 << 28)
    compiled = compiled_engine(args.graph, args.weights, args.cpp_wrapper)
    problems = get_task("digit-reversal").held_out(args.requests)
    prompts = [chat_prompt(eager.tokenizer, [{"role": "user", "content": p.question}]) for p in problems]

    def run(llm: LLM, policy: str, prompt: str) -> tuple[float, list[int]]:
        engine = llm.engine
        engine.add_request(f"{policy}-{time.monotonic_ns()}", prompt,
                           SamplingParams(gen_length=128, block_length=32, steps=128, cache_policy=policy))
        steps, start, tokens = 0, time.perf_counter(), []
        while engine.has_unfinished_requests():
            tokens = [o.token_ids for o in engine.step() if o.finished] or tokens
            steps += 1
        return (time.perf_counter() - start) / steps * 1e3, tokens[0]

    start = time.perf_counter()
    for policy in ("none", "entropy"):
        run(compiled, policy, prompts[0])
    print(f"{args.graph} graph, {args.weights} weights, cpp_wrapper={args.cpp_wrapper}, {args.threads} threads; "
          f"first requests (compiling): {time.perf_counter() - start:.1f} s")
    for policy in ("none", "entropy"):
        eager_ms, compiled_ms, same = [], [], 0
        for prompt in prompts:
            (a, ta), (b, tb) = run(eager, policy, prompt), run(compiled, policy, prompt)
            eager_ms.append(a)
            compiled_ms.append(b)
            same += ta == tb
        e, k = statistics.median(eager_ms), statistics.median(compiled_ms)
        print(f"{policy}: eager {e:.2f} ms/step, compiled {k:.2f} ms/step ({e / k:.2f}x); "
              f"{same}/{len(prompts)} answers token-identical")


if __name__ == "__main__":
    main()
