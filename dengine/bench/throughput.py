"""Offline throughput: aggregate tokens/s, forwards, query tokens, KV usage and model FLOPs utilisation.

    python -m dengine.bench.throughput --model llada-reverse --policies none entropy dual --n 64
    python -m dengine.bench.throughput --concurrency 1 4 16 64 --policies entropy    # batched vs one at a time
    python -m dengine.bench.throughput --prompt-source random --input-len 256 --gen-length 256

Requests are held-out task problems (chat-templated) or random token prompts of a given length. Each
policy runs the same requests through one engine; `--concurrency` runs C requests batched (max_num_seqs C)
and the same C one at a time, and reports the ratio. MFU is the model's matmul FLOPs (projections, MLP and
attention over the whole canvas, for the computed rows) per second over the peak of one large matmul
timed in the same dtype on the same device in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dengine.assets import resolve_model
from dengine.bench.accuracy import output_stats, parse_policy
from dengine.bench.policies import sampler_params
from dengine.bench.report import QuietCheck, figure, measured_peak_flops, plot_title, run_record, write_report
from dengine.config import ModelConfig
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.llm import LLM, chat_prompt
from dengine.tasks import Task, generation_lengths, task_of_folder


@dataclass
class ThroughputResult:
    policy: str
    cache_config: dict[str, Any] | None
    requests: int
    max_num_seqs: int
    wall_s: float
    tokens_per_s: float  # committed generated positions (EOS padding included) per second
    answer_tokens_per_s: float  # generated tokens before the first EOS per second
    nfe: float  # forwards per request
    tokens_per_forward: float
    query_tokens_per_forward: float
    full_recompute_rate: float
    engine_steps: int
    mean_step_ms: float
    peak_kv_usage: float  # largest fraction of the KV pool in use
    model_tflops: float  # achieved
    mfu: float  # achieved / measured peak


def flops_per_query_token(config: ModelConfig, canvas_tokens: int) -> float:
    """Matmul FLOPs of one computed position: q/k/v/o projections, SwiGLU, attention over the canvas."""
    h, q = config.hidden_size, config.num_heads * config.head_dim
    projections = h * (q + 2 * config.kv_dim) + q * h + 3 * h * config.intermediate_size
    attention = 2 * canvas_tokens * q  # scores and weighted values
    return 2 * config.num_layers * (projections + attention)


def make_prompts(llm: LLM, task: Task | None, n: int, input_len: int, seed: int) -> list[dict]:
    """The task's held-out questions as chats, or (task None) random prompts of input_len tokens."""
    if task is not None:
        return [chat_prompt(llm.tokenizer, [{"role": "user", "content": p.question}]) for p in task.held_out(n)]
    config = llm.engine.config
    special = {config.mask_token_id, config.eos_token_id, config.pad_token_id, config.bos_token_id}
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        ids = torch.randint(0, config.vocab_size, (input_len,), generator=generator).tolist()
        prompts.append({"prompt_token_ids": [i if i not in special else 0 for i in ids]})
    return prompts


def run(llm: LLM, prompts: list[dict], params, max_num_seqs: int, use_tqdm: bool, peak: float) -> ThroughputResult:
    """Every prompt through the engine at once (max_num_seqs at a time), timing the real step loop."""
    engine = llm.engine
    engine.scheduler.max_num_seqs = max_num_seqs
    batch = time.monotonic_ns()
    sequences = [engine.make_sequence(f"bench-{batch}-{i}", p, params) for i, p in enumerate(prompts)]
    outputs, steps, peak_usage = [], 0, 0.0
    bar = tqdm(total=len(sequences), desc=f"{params.cache_policy} x{max_num_seqs}", unit="req",
               disable=not use_tqdm, dynamic_ncols=True)
    start = time.perf_counter()
    for seq in sequences:
        engine.add_sequence(seq)
    while engine.has_unfinished_requests():
        finished = engine.step()
        steps += 1
        peak_usage = max(peak_usage, engine.kv_manager.usage)
        outputs.extend(finished)
        bar.update(len(finished))
    wall = time.perf_counter() - start
    bar.close()
    flops = sum(o.metrics.query_tokens * flops_per_query_token(engine.config, len(o.prompt_token_ids)
                                                                + params.gen_length) for o in outputs)
    return ThroughputResult(
        policy=params.cache_policy, cache_config=params.cache_config, requests=len(outputs),
        max_num_seqs=max_num_seqs, wall_s=wall, **output_stats(outputs, wall, engine.config.eos_token_id),
        engine_steps=steps, mean_step_ms=1e3 * wall / steps, peak_kv_usage=peak_usage,
        model_tflops=flops / wall / 1e12, mfu=flops / wall / peak,
    )


def table(results: list[ThroughputResult]) -> str:
    lines = ["| policy | options | requests | max_num_seqs | tokens/s (all) | tokens/s (before EOS) | NFE | "
             "tokens/forward | query tokens/forward | full recompute | engine steps | ms/step | peak KV | TFLOP/s "
             "| MFU |",
             "|" + "---|" * 15]
    for r in results:
        options = json.dumps(r.cache_config) if r.cache_config else ""
        lines.append(f"| {r.policy} | {options} | {r.requests} | {r.max_num_seqs} | {r.tokens_per_s:.1f} | "
                     f"{r.answer_tokens_per_s:.1f} | {r.nfe:.1f} | {r.tokens_per_forward:.2f} | "
                     f"{r.query_tokens_per_forward:.1f} | {r.full_recompute_rate:.1%} | {r.engine_steps} | "
                     f"{r.mean_step_ms:.1f} | {r.peak_kv_usage:.1%} | {r.model_tflops:.3f} | {r.mfu:.1%} |")
    return "\n".join(lines)


def ratio_table(pairs: list[tuple[ThroughputResult, ThroughputResult]]) -> str:
    lines = ["| policy | concurrency | batched tokens/s | one-at-a-time tokens/s | batched / one at a time | "
             "batched ms/step |", "|" + "---|" * 6]
    for batched, single in pairs:
        lines.append(f"| {batched.policy} | {batched.max_num_seqs} | {batched.tokens_per_s:.1f} | "
                     f"{single.tokens_per_s:.1f} | {batched.tokens_per_s / single.tokens_per_s:.2f}x | "
                     f"{batched.mean_step_ms:.1f} |")
    return "\n".join(lines)


def plot(pairs: list[tuple[ThroughputResult, ThroughputResult]], path: Path, title: str | None = None) -> None:
    with figure(path, title, figsize=(6, 4)) as (_, ax):
        for policy in dict.fromkeys(b.policy for b, _ in pairs):
            chosen = [(b, s) for b, s in pairs if b.policy == policy]
            xs = [b.max_num_seqs for b, _ in chosen]
            ax.plot(xs, [b.tokens_per_s for b, _ in chosen], marker="o", label=f"{policy}, batched")
            ax.plot(xs, [s.tokens_per_s for _, s in chosen], marker="x", linestyle="--",
                    label=f"{policy}, one at a time")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("generated tokens/s (all positions)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dengine bench throughput", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="llada-reverse")
    parser.add_argument("--policies", nargs="+", default=["none", "entropy", "dual"])
    parser.add_argument("--n", type=positive_int, default=64, help="requests per policy (without --concurrency)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=None,
                        help="instead: for each C, C requests batched and the same C one at a time")
    parser.add_argument("--prompt-source", choices=["task", "random"], default="task")
    parser.add_argument("--input-len", type=int, default=64, help="random prompts only")
    parser.add_argument("--gen-length", type=int, default=None,
                        help="default: the model's task's (task.json), else 128")
    parser.add_argument("--block-length", type=int, default=None, help="default: the model's task's, else 32")
    parser.add_argument("--sampler", default="one-token", help="one-token, threshold:V or factor:V")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true", help="LLM(compile=True): fused elementwise steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true", help="throughput vs concurrency (with --concurrency)")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max([args.max_num_seqs, *(args.concurrency or [])]),
              compile=args.compile)
    task = task_of_folder(resolve_model(args.model))
    if task is None and args.prompt_source == "task":
        parser.error(f"{args.model} names no task (no task.json): use --prompt-source random")
    base = sampler_params(args.sampler, *generation_lengths(task, args.gen_length, args.block_length))
    task = task if args.prompt_source == "task" else None
    policies = [parse_policy(p) for p in args.policies]
    dtype = next(llm.engine.model.parameters()).dtype
    check = QuietCheck()
    peak = measured_peak_flops(llm.engine.device, dtype)
    use_tqdm = not args.no_tqdm
    if args.compile:  # compile the fused steps before any timed run: one short batch of full recomputes
        warm = base.replace(gen_length=base.resolved_block_length)
        run(llm, make_prompts(llm, task, 16, args.input_len, args.seed), warm, 16, False, peak)
    results, pairs = [], []
    for name, config in policies:
        params = base.replace(cache_policy=name, cache_config=config)
        if args.concurrency is None:
            prompts = make_prompts(llm, task, args.n, args.input_len, args.seed)
            results.append(run(llm, prompts, params, args.max_num_seqs, use_tqdm, peak))
            continue
        for c in args.concurrency:
            prompts = make_prompts(llm, task, c, args.input_len, args.seed)
            pair = (run(llm, prompts, params, c, use_tqdm, peak), run(llm, prompts, params, 1, use_tqdm, peak))
            pairs.append(pair)
            results.extend(pair)
    markdown = table(results) + ("\n\n" + ratio_table(pairs) if pairs else "")
    print(markdown)
    print(f"\nmeasured peak: {peak / 1e12:.2f} TFLOP/s ({dtype}, one 2048^3 matmul); linear weights "
          f"{'prepacked' if llm.engine.prepacked else 'plain'}")
    record = run_record("python -m dengine.bench.throughput", argv, check, peak_tflops=peak / 1e12,
                        prepacked=llm.engine.prepacked, results=[asdict(r) for r in results])
    what = f"{args.model}: batched against one at a time"
    write_report(args.out, record, markdown,
                 (lambda path: plot(pairs, path, plot_title(record, what))) if args.plot and pairs else None)
    return record


if __name__ == "__main__":
    main()
