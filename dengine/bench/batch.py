"""Offline batch files: rows/s through `dengine run-batch` at 1 and 2 replicas, against LLM.chat in one process on
the same prompts (the cost of the batch path per row, as a ratio).

    python -m dengine.bench.batch --n 256 --out docs/bench/run-batch

The rows are held-out questions of the embedded model's task as chat completions at the server's defaults. One
replica runs in this process (the batch path's own cost: parsing, the server's validation, the JSON of every
result, the writes); two run through Ray Data as actors of --num-cpus each (Ray's start and the actors' model
loads included in the wall time, as a user waits for them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dengine.assets import resolve_model
from dengine.bench.report import QuietCheck, run_record, write_report
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.llm import LLM
from dengine.sampling_params import SamplingParams
from dengine.serve.batch import default_lengths, run_batch
from dengine.tasks import task_of_folder


def write_requests(path: Path, model: str, questions: list[str]) -> None:
    with path.open("w") as f:
        for i, question in enumerate(questions):
            f.write(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": model, "messages": [{"role": "user", "content": question}]}}) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dengine bench batch", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="llada-sudoku")
    parser.add_argument("--n", type=positive_int, default=256, help="rows")
    parser.add_argument("--replicas", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Ray replica")
    parser.add_argument("--cache-policy", default="entropy")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    check = QuietCheck()
    folder = resolve_model(args.model)
    questions = [p.question for p in task_of_folder(folder).held_out(args.n)]
    engine_kwargs = {"cache_policy": args.cache_policy}
    defaults = default_lengths(folder)
    rows = []

    llm = LLM(folder, **engine_kwargs)
    start = time.perf_counter()
    llm.chat([[{"role": "user", "content": q}] for q in questions], SamplingParams(**defaults), use_tqdm=False)
    offline = time.perf_counter() - start
    rows.append({"path": "LLM.chat, one process", "replicas": 1, "seconds": offline, "rows_per_s": args.n / offline,
                 "cost_ratio": 1.0, "first_row_s": None, "rows_per_s_after_first": None})
    del llm
    with tempfile.TemporaryDirectory(prefix="dengine-bench-batch-") as tmp:
        source = Path(tmp) / "requests.jsonl"
        write_requests(source, folder.name, questions)
        for replicas in args.replicas:
            out = Path(tmp) / f"results-{replicas}.jsonl"
            summary = run_batch(source, out, args.model, replicas, engine_kwargs, defaults=defaults,
                                num_cpus=args.num_cpus if replicas > 1 else None, use_tqdm=False)
            assert summary["written"] == args.n and summary["errors"] == 0, summary
            rows.append({"path": "run-batch" + (" (Ray Data)" if replicas > 1 else ", in process"),
                         "replicas": replicas, "seconds": summary["seconds"], "rows_per_s": summary["rows_per_s"],
                         "cost_ratio": (summary["seconds"] / args.n) / (offline / args.n),
                         "first_row_s": summary["first_row_s"],
                         "rows_per_s_after_first": summary["rows_per_s_after_first"]})
    record = run_record("python -m dengine.bench.batch", argv, check, model=args.model, n=args.n,
                        cache_policy=args.cache_policy, rows=rows)
    lines = [f"{args.n} held-out {folder.name} chat completions, {args.cache_policy}, the server's default lengths",
             "", "| path | replicas | wall s | rows/s | cost per row vs LLM.chat | first row after s | rows/s after it |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['replicas']} | {r['seconds']:.1f} | {r['rows_per_s']:.2f} | {r['cost_ratio']:.2f}x | "
              f"{_maybe(r['first_row_s'], '.1f')} | {_maybe(r['rows_per_s_after_first'], '.2f')} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, record, text)
    return record


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
