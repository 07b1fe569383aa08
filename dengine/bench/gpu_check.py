"""One call to validate a GPU: the CUDA tests, the attention backends against each other, the embedded models'
accuracy in bf16 and a throughput run at full size, in one JSON + Markdown record.

    python -m dengine.bench.gpu_check --out docs/bench/gpu-check            # on a GPU machine, from a checkout
    python -m dengine.bench.gpu_check --device cpu --small                   # the same stages, small, on CPU

Stages (each recorded with its time and whether it passed; a failing stage does not stop the others):
1. environment: device, torch / CUDA / flash-attn / xformers versions, memory;
2. tests: the test files with CUDA tests (run from a checkout; skipped when tests/ is absent);
3. backends: every attention backend available on the device against the torch backend, on random ragged
   batches of both embedded models (a full step, then a partial one), within bf16's tolerance;
4. accuracy: the embedded Sudoku models in bf16, exact decoding and EntropyCache, against the CPU records;
5. throughput: a random-weight checkpoint of LLaDA-8B-Instruct's full config (written first, weights drawn
   on the device), none / entropy / dual at concurrency 1, 16 and 64, MFU against the matmul peak measured
   on the device in the same run.
`--small` shrinks every stage (a narrow 2-layer checkpoint, 8 problems, concurrency 1 and 2) so that the
whole check runs in a minute on a CPU; CI runs it that way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dengine.assets import resolve_model
from dengine.bench import throughput, width
from dengine.bench.accuracy import evaluate
from dengine.bench.report import measured_peak_flops, run_record, write_report
from dengine.cli_args import DefaultsHelpFormatter
from dengine.kv.kv_cache import PagedKVCache
from dengine.llm import LLM
from dengine.model_runner import ModelRunner, SequenceQuery
from dengine.models.loader import load_model
from dengine.sampling_params import SamplingParams
from dengine.attention import available_backends, select_backend
from dengine.tasks import task_of_folder

REPO = Path(__file__).resolve().parents[2]
CUDA_TEST_FILES = ("tests/test_attention_backends.py", "tests/test_kernel_doubles.py")
EMBEDDED = {"llada": "llada-sudoku", "dream": "dream-sudoku"}
# accuracy of the embedded models on 500 held-out puzzles on CPU (docs/benchmarks.md, section 1): a run below it
# by more than ACCURACY_SLACK (or, on few problems, three standard errors) is a failure
CPU_ACCURACY = {("llada", "none"): 0.976, ("llada", "entropy"): 0.972,
                ("dream", "none"): 0.982, ("dream", "entropy"): 0.966}
ACCURACY_SLACK = 0.05
BF16_TOLERANCE = 2e-2  # of the largest logit: what bf16 kernels may differ by
SMALL_WIDTH = {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 512}


def environment(device: torch.device) -> dict[str, Any]:
    """The machine's GPU stack."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": sys.version.split()[0], "backends": available_backends(device)}
    for package in ("flash-attn", "xformers", "transformers"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    compute_capability=f"{props.major}.{props.minor}")
    return info


def cuda_tests(timeout_s: float) -> dict[str, Any]:
    """The test files that hold CUDA tests, run with pytest in a child process (from a checkout)."""
    files = [f for f in CUDA_TEST_FILES if (REPO / f).exists()]
    if not files:
        return {"skipped": "no tests/ folder beside the package (run from a checkout)", "passed": True}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    return {"files": files, "returncode": result.returncode, "summary": summary, "passed": result.returncode == 0}


def backends_agree(device: torch.device, seed: int) -> dict[str, Any]:
    """Every available backend's logits against the torch backend's, for a full then a partial step of a random
    ragged batch of each embedded model (bf16 on device), each backend at its own default block size."""
    rng = random.Random(seed)
    worst: dict[str, float] = {}
    for family, name in EMBEDDED.items():
        model = load_model(resolve_model(name), dtype="bfloat16", device=device)
        lengths = [rng.randint(20, 90) for _ in range(rng.randint(2, 5))]
        canvases = [torch.randint(0, model.config.vocab_size, (n,)) for n in lengths]
        partial = [torch.tensor(sorted(rng.sample(range(n), min(12, n)))) for n in lengths]
        results = {}
        for backend_name in available_backends(device):
            backend = select_backend(device, backend_name)
            size = backend.default_block_size
            tables, used = [], 0
            for n in lengths:
                tables.append(list(range(used, used + -(-n // size))))
                used += len(tables[-1])
            runner = ModelRunner(model, PagedKVCache(model.config, used, size, torch.bfloat16, device), backend)
            outs = runner.run([SequenceQuery(c, t, torch.arange(c.numel())) for c, t in zip(canvases, tables)])
            outs += runner.run([SequenceQuery(c, t, p) for c, t, p in zip(canvases, tables, partial)])
            results[backend_name] = [out.float().cpu() for out in outs]
        for backend_name, outs in results.items():
            worst[f"{family}/{backend_name}"] = max(float((got - ref).abs().max() / ref.abs().max())
                                                    for got, ref in zip(outs, results["torch"]))
        del model
    return {"worst_relative_error": worst, "tolerance": BF16_TOLERANCE,
            "passed": all(error < BF16_TOLERANCE for error in worst.values())}


def accuracy(device: torch.device, n: int, use_tqdm: bool) -> dict[str, Any]:
    """The embedded models in bf16 on device: exact decoding and EntropyCache at its defaults."""
    rows, passed = [], True
    for family, name in EMBEDDED.items():
        folder = resolve_model(name)
        task = task_of_folder(folder)
        problems = task.held_out(n)
        llm = LLM(folder, dtype="bfloat16", device=device)
        base = SamplingParams(gen_length=task.gen_length, block_length=task.block_length)
        for policy in ("none", "entropy"):
            result = evaluate(llm, problems, base.replace(cache_policy=policy), use_tqdm=use_tqdm, samples=0)
            reference = CPU_ACCURACY[(family, policy)]
            ok = result.accuracy >= reference - max(ACCURACY_SLACK, 3 * math.sqrt(reference * (1 - reference) / n))
            passed &= ok
            rows.append({"model": name, "policy": policy, "n": n, "accuracy": result.accuracy,
                         "cpu_accuracy_500": reference, "nfe": result.nfe, "passed": ok})
        del llm
    return {"rows": rows, "passed": passed}


def full_size_throughput(device: torch.device, small: bool, folder: Path, use_tqdm: bool) -> dict[str, Any]:
    """A random-weight LLaDA-8B (or, small, a narrow 2-layer one) through the engine: none / entropy / dual at
    several concurrencies, tokens/s and MFU against the matmul peak measured here."""
    layers, overrides = (2, SMALL_WIDTH) if small else (32, None)
    start = time.perf_counter()
    width.write_random_checkpoint(folder, "llada", layers, overrides=overrides, device=device)
    written_s = time.perf_counter() - start
    start = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", device=device, skip_tokenizer_init=True)
    load_s = time.perf_counter() - start
    peak = measured_peak_flops(device, torch.bfloat16, size=1024 if small else 8192)
    concurrencies = (1, 2) if small else (1, 16, 64)
    gen_length, block_length = (32, 16) if small else (64, 32)
    rows = []
    for policy in ("none", "entropy", "dual"):
        params = SamplingParams(gen_length=gen_length, block_length=block_length, cache_policy=policy)
        for concurrency in concurrencies:
            prompts = throughput.make_prompts(llm, None, concurrency, input_len=64, seed=concurrency)
            result = throughput.run(llm, prompts, params, concurrency, use_tqdm, peak)
            rows.append({"policy": policy, "concurrency": concurrency, "tokens_per_s": result.tokens_per_s,
                         "ms_per_step": result.mean_step_ms, "query_tokens_per_forward": result.query_tokens_per_forward,
                         "full_recompute_rate": result.full_recompute_rate, "mfu": result.mfu,
                         "model_tflops": result.model_tflops})
    return {"layers": layers, "write_s": written_s, "load_s": load_s, "peak_tflops": peak / 1e12,
            "gen_length": gen_length, "block_length": block_length, "rows": rows,
            "passed": all(row["tokens_per_s"] > 0 for row in rows)}


def run_stage(name: str, stage: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A stage's result with its wall time; an exception becomes a failed stage with its traceback."""
    start = time.perf_counter()
    try:
        result = stage()
    except Exception:  # noqa: BLE001 - one broken stage must not hide the others' results
        result = {"passed": False, "error": traceback.format_exc(limit=6)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu_check: {name}: {'passed' if result['passed'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    return result


def markdown(record: dict[str, Any]) -> str:
    stages = record["stages"]
    lines = ["| stage | passed | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if s['passed'] else '**no**'} | {s['seconds']} |" for name, s in stages.items()]
    env = stages["environment"]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("passed", "seconds"))]
    if "summary" in stages["tests"]:
        lines += ["", f"Tests ({', '.join(stages['tests']['files'])}): {stages['tests']['summary']}"]
    if "worst_relative_error" in stages["backends"]:
        lines += ["", "Backends against torch, worst |logit difference| / max |logit|: " + ", ".join(
            f"{k} {v:.2e}" for k, v in stages["backends"]["worst_relative_error"].items())]
    if "rows" in stages["accuracy"]:
        lines += ["", "| model | policy | n | accuracy | CPU, 500 | NFE |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['policy']} | {r['n']} | {r['accuracy']:.1%} | {r['cpu_accuracy_500']:.1%} | "
                  f"{r['nfe']:.1f} |" for r in stages["accuracy"]["rows"]]
    if "rows" in stages["throughput"]:
        t = stages["throughput"]
        lines += ["", f"Random-weight LLaDA-8B config, {t['layers']} layers: written in {t['write_s']:.0f} s, loaded in "
                  f"{t['load_s']:.0f} s; gen {t['gen_length']}, blocks of {t['block_length']}; matmul peak "
                  f"{t['peak_tflops']:.1f} TFLOP/s", "",
                  "| policy | concurrency | tokens/s | ms/step | query tokens/forward | full recompute | MFU |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                  f"{r['query_tokens_per_forward']:.1f} | {r['full_recompute_rate']:.0%} | {r['mfu']:.1%} |"
                  for r in t["rows"]]
    failed = [f"{name}:\n{s['error']}" for name, s in stages.items() if "error" in s]
    if failed:
        lines += ["", "Errors:", "", "```", *failed, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m dengine.bench.gpu_check", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="every stage small (CI runs it on CPU this way)")
    parser.add_argument("--n", type=int, default=None, help="accuracy problems per model (default 200; 8 small)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the random checkpoint is written (default: a temporary folder)")
    parser.add_argument("--tests-timeout", type=float, default=180.0, help="seconds for the CUDA tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    n = args.n or (8 if args.small else 200)
    use_tqdm = not args.no_tqdm
    with tempfile.TemporaryDirectory(prefix="dengine-gpu-check-") as tmp:
        folder = args.folder or Path(tmp) / "llada-8b-random"
        stages = {
            "environment": run_stage("environment", lambda: {**environment(device), "passed": True}),
            "tests": run_stage("tests", lambda: cuda_tests(args.tests_timeout)),
            "backends": run_stage("backends", lambda: backends_agree(device, args.seed)),
            "accuracy": run_stage("accuracy", lambda: accuracy(device, n, use_tqdm)),
            "throughput": run_stage("throughput", lambda: full_size_throughput(device, args.small, folder, use_tqdm)),
        }
    record = run_record("python -m dengine.bench.gpu_check", argv, stages=stages,
                        passed=all(s["passed"] for s in stages.values()))
    text = markdown(record)
    print(text)
    write_report(args.out, record, text)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
