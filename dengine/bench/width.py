"""Step cost at the real models' width: random weights in LLaDA-8B's or Dream-7B's real format and width.

    python -m dengine.bench.width --family llada --layers 1 2 --out docs/bench/width-llada
    python -m dengine.bench.width --family dream --layers 1 2 --out docs/bench/width-dream

Writes (once, into --folder) a checkpoint folder of the real format: the real config.json with fewer layers,
the real tensor names and shapes, random bf16 weights. Then, for each layer count, times one step against
the number of rows computed (one sequence, its whole canvas cached, logits at up to one block of rows),
and takes the cost of one layer as the difference between two layer counts. The policies' cost-side
speedup over none at the papers' settings (gen 256, block 32; one token per step and threshold 0.9) comes
from each policy's recorded schedule on the family's embedded model (forwards per request and query rows
per forward, same prompts), priced by the real-width step time at those rows. Random weights say nothing
about accuracy; they say what a step costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from dengine.bench.policies import sampler_params
from dengine.bench.report import QuietCheck, measured_peak_flops, run_record, write_report
from dengine.bench.throughput import flops_per_query_token
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.kv.kv_cache import PagedKVCache
from dengine.llm import LLM, chat_prompt
from dengine.model_runner import ModelRunner, SequenceQuery
from dengine.models.layers import prepack_if_supported
from dengine.models.loader import INDEX_FILE, load_model, read_model_config
from dengine.tasks import task_of_folder

# The real config.json and generation_config.json of LLaDA-8B-Instruct and Dream-v0-Instruct-7B
# (as published with the checkpoints), the fields dengine reads; LAYERS names the layer count.
REAL_CONFIGS = {
    "llada": {
        "activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False, "bias_for_layer_norm": False, "block_type": "llama", "d_model": 4096,
        "embedding_size": 126464, "eos_token_id": 126081, "include_bias": False, "include_qkv_bias": False,
        "input_emb_norm": False, "layer_norm_type": "rms", "mask_token_id": 126336, "max_sequence_length": 4096,
        "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "n_heads": 32, "n_kv_heads": 32,
        "n_layers": 32, "pad_token_id": 126081, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "vocab_size": 126464, "weight_tying": False,
    },
    "dream": {
        "architectures": ["DreamModel"], "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 3584, "intermediate_size": 18944, "mask_token_id": 151666, "max_position_embeddings": 131072,
        "model_type": "Dream", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 152064,
    },
}
REAL_GENERATION = {"llada": {"bos_token_id": 126080, "eos_token_id": 126081},
                   "dream": {"bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643}}
LAYERS = {"llada": "n_layers", "dream": "num_hidden_layers"}
EMBEDDED = {"llada": "llada-reverse", "dream": "dream-reverse"}
POLICIES = ["none", "prefix", "dual", "entropy", "dllm", "d2cache"]


def write_random_checkpoint(folder: Path, family: str, num_layers: int, seed: int = 0,
                            overrides: dict | None = None, device: torch.device | str = "cpu") -> Path:
    """A checkpoint folder of the family's real format: its real config with num_layers layers (and any
    overrides, e.g. a smaller width for tests), random bf16 weights under the real tensor names, one shard for
    the embedding, final norm and LM head and one per layer, with the index the real folders have. The weights
    are drawn on device (a GPU draws 8B weights in seconds; the values depend on the device)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = {**REAL_CONFIGS[family], LAYERS[family]: num_layers, **(overrides or {})}
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(REAL_GENERATION[family], indent=2))
    cls, config = read_model_config(folder)
    with torch.device("meta"):
        model = cls(config)
    params = dict(model.named_parameters())
    generator = torch.Generator(device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers + 1)]
    for param_name, parts in model.checkpoint_layout().items():
        shard = int(param_name.split(".")[1]) + 1 if param_name.startswith("layers.") else 0
        for tensor_name, rows in parts:
            shape = (rows, *params[param_name].shape[1:])
            if len(shape) == 1 and "norm" in param_name:
                shards[shard][tensor_name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                weights = torch.randn(shape, generator=generator, device=device) * 0.02
                shards[shard][tensor_name] = weights.to(torch.bfloat16).cpu()
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
        tensors.clear()
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def step_times(folders: list[Path], canvas: int, rows: list[int], block: int, repeats: int,
               clock: Callable[[], float] = time.perf_counter, prepack: bool = True) -> list[dict[int, float]]:
    """Per checkpoint folder, the median seconds (by clock) of one step computing r rows of a canvas whose
    whole K/V is cached, per r in rows, logits at up to block of the rows (a block's masks) as a decoding
    step reads them. The folders' models take turns at every repetition, so that a change in the machine's
    load between them does not masquerade as a difference. prepack: the linear weights prepacked as the engine
    prepacks them (bf16 on CPU)."""
    block_size = 16
    table = list(range(-(-canvas // block_size)))
    runners, tokens = [], None
    for folder in folders:
        model = load_model(folder, dtype="bfloat16")
        if prepack:
            prepack_if_supported(model)
        cache = PagedKVCache(model.config, len(table), block_size, torch.bfloat16, "cpu")
        runners.append(ModelRunner(model, cache))
        tokens = torch.randint(0, model.config.vocab_size, (canvas,), generator=torch.Generator().manual_seed(0))
    for runner in runners:
        runner.run([SequenceQuery(tokens, table, torch.arange(canvas), logits_positions=torch.arange(block))])
    samples: list[dict[int, list[float]]] = [{r: [] for r in rows} for _ in folders]
    for r in rows:
        positions = torch.arange(canvas - r, canvas)
        query = [SequenceQuery(tokens, table, positions, logits_positions=positions[: min(r, block)])]
        for runner in runners:
            runner.run(query)
        for _ in range(repeats):
            for runner, times in zip(runners, samples):
                start = clock()
                runner.run(query)
                times[r].append(clock() - start)
    return [{r: statistics.median(times[r]) for r in rows} for times in samples]


def interpolate(times: dict[int, float], r: float) -> float:
    """Step time at r rows, linear between the measured row counts (beyond them, the last segment's slope)."""
    xs = sorted(times)
    below = max([x for x in xs[:-1] if x <= r], default=xs[0])
    above = xs[xs.index(below) + 1]
    slope = (times[above] - times[below]) / (above - below)
    return times[below] + slope * (r - below)


def policy_schedules(family: str, samplers: list[str], n: int, gen_length: int, block_length: int) -> list[dict]:
    """Each policy's forwards per request and query rows per forward on the family's embedded model, on n
    held-out problems at the given lengths (no early stop: every request decodes its whole generation)."""
    llm = LLM(EMBEDDED[family], dtype="bfloat16")
    task = task_of_folder(llm.engine.model_path)
    prompts = [chat_prompt(llm.tokenizer, [{"role": "user", "content": p.question}]) for p in task.held_out(n)]
    prompt_len = statistics.mean(len(p["prompt_token_ids"]) for p in prompts)
    schedules = []
    for sampler in samplers:
        base = sampler_params(sampler, gen_length, block_length).replace(stop_at_eos=False)
        for policy in POLICIES:
            outputs = llm.generate(prompts, base.replace(cache_policy=policy), use_tqdm=False)
            forwards = sum(o.metrics.nfe for o in outputs)
            schedules.append({"sampler": sampler, "policy": policy, "nfe": forwards / len(outputs),
                              "rows": sum(o.metrics.query_tokens for o in outputs) / forwards,
                              "canvas": round(prompt_len) + gen_length})
    llm.shutdown()
    return schedules


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dengine bench width", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--family", choices=sorted(REAL_CONFIGS), default="llada")
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[1, 2],
                        help="layer counts to time (two or more give the cost of one layer)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/dengine-width"),
                        help="where the random checkpoints are written (kept and reused)")
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--samplers", nargs="+", default=["one-token", "threshold:0.9"])
    parser.add_argument("--n", type=positive_int, default=8, help="embedded-model problems whose schedules are recorded")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps by the process's CPU time instead of wall time (on a shared machine)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="time the plain linear weights (the engine prepacks them for bf16 on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)

    check = QuietCheck()
    peak = measured_peak_flops("cpu", torch.bfloat16)
    schedules = policy_schedules(args.family, args.samplers, args.n, args.gen_length, args.block_length)
    canvas = schedules[0]["canvas"]
    rows = sorted({*args.rows, canvas})
    folders = [args.folder / f"{args.family}-{layers}-layers" for layers in args.layers]
    for layers, folder in zip(args.layers, folders):
        if not (folder / INDEX_FILE).is_file():
            write_random_checkpoint(folder, args.family, layers)
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = dict(zip(args.layers, step_times(folders, canvas, rows, args.block_length, args.repeats, clock,
                                                   not args.no_prepack)))
    config = read_model_config(args.folder / f"{args.family}-{args.layers[0]}-layers")[1]
    full_layers = REAL_CONFIGS[args.family][LAYERS[args.family]]
    low, high = min(args.layers), max(args.layers)
    per_layer = {r: (times[high][r] - times[low][r]) / (high - low) for r in rows}
    fixed = {r: times[low][r] - low * per_layer[r] for r in rows}
    full_model = {r: fixed[r] + full_layers * per_layer[r] for r in rows}
    one_layer_flops = {r: r * flops_per_query_token(config, canvas) / config.num_layers for r in rows}

    lines = [f"canvas {canvas} positions, bf16, {torch.get_num_threads()} threads, measured peak "
             f"{peak / 1e12:.2f} TFLOP/s (wall); step time in ms ({'CPU' if args.cpu_time else 'wall'}); linear "
             f"weights {'plain' if args.no_prepack else 'prepacked'}\n",
             "| rows | " + " | ".join(f"{n} layers" for n in args.layers) + " | one layer | one layer's TFLOP/s "
             f"| predicted {full_layers} layers |", "|" + "---|" * (len(args.layers) + 4)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(f"{1e3 * times[n][r]:.1f}" for n in args.layers)
                     + f" | {1e3 * per_layer[r]:.1f} | {one_layer_flops[r] / per_layer[r] / 1e12:.3f} "
                     f"| {1e3 * full_model[r]:.0f} |")
    lines += ["", f"Policies at the papers' settings (gen {args.gen_length}, block {args.block_length}), rows "
                  f"recorded on {EMBEDDED[args.family]} ({args.n} problems), priced at the predicted "
                  f"{full_layers}-layer step:", "",
              "| sampler | policy | forwards / request | rows / forward | predicted s / request | "
              "cost-side speedup over none |", "|" + "---|" * 6]
    seconds = {}
    for s in schedules:
        seconds[s["sampler"], s["policy"]] = s["nfe"] * interpolate(full_model, s["rows"])
    for s in schedules:
        cost = seconds[s["sampler"], s["policy"]]
        lines.append(f"| {s['sampler']} | {s['policy']} | {s['nfe']:.1f} | {s['rows']:.1f} | {cost:.1f} | "
                     f"{seconds[s['sampler'], 'none'] / cost:.2f}x |")
    markdown = "\n".join(lines)
    print(markdown)
    record = run_record("python -m dengine.bench.width", argv, check, peak_tflops=peak / 1e12,
                        family=args.family, canvas=canvas, prepack=not args.no_prepack, times={n: times[n] for n in args.layers},
                        per_layer=per_layer, predicted_full_model=full_model, schedules=schedules)
    write_report(args.out, record, markdown)
    return record


if __name__ == "__main__":
    main()
