"""What tracing costs: the same batch decoded with SamplingParams(trace=False) and trace=True, interleaved.

    python benchmarks/trace_cost.py --model llada-sudoku --n 32 --repeats 5

Prints the median and fastest wall time of each, the traced run's overhead (from the medians), and the time spent inside the recorder
itself (immune to a busy machine's noise). Run it with PYTHONPATH pointing at another checkout (one without
tracing) to compare trace=False against code that has no tracing at all: its rows are then the untraced
ones only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import msgspec

from dengine import LLM, SamplingParams
from dengine.bench.accuracy import model_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-sudoku")
    parser.add_argument("--policy", default="entropy")
    parser.add_argument("--n", type=int, default=32, help="held-out problems decoded as one batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    task = model_task(args.model, None)
    llm = LLM(args.model, dtype="float32", cache_policy=args.policy)
    chats = [[{"role": "user", "content": p.question}] for p in task.held_out(args.n)]
    params = SamplingParams(gen_length=task.gen_length, block_length=task.block_length)
    traced = "trace" in SamplingParams.__struct_fields__
    variants = {"off": params, "on": params.replace(trace=True)} if traced else {"no tracing code": params}
    recorder = _time_recorder() if traced else None
    llm.chat(chats, params, use_tqdm=False)  # warm up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, p in variants.items():
            start = time.perf_counter()
            outputs = llm.chat(chats, p, use_tqdm=False)
            times[name].append(time.perf_counter() - start)
    steps = sum(o.metrics.nfe for o in outputs)
    for name, values in times.items():
        print(f"trace {name}: median {statistics.median(values):.3f} s, fastest {min(values):.3f} s for {args.n} "
              f"requests ({steps} request-steps), runs {' '.join(f'{v:.3f}' for v in values)}")
    if traced:
        off, on = (statistics.median(times[name]) for name in ("off", "on"))
        size = sum(len(msgspec.json.encode(o.trace)) for o in outputs) / len(outputs)
        inside = recorder["seconds"] / args.repeats
        print(f"tracing on: {100 * (on / off - 1):+.1f}% wall time ({1e6 * (on - off) / steps:+.0f} us per "
              f"request-step); inside the recorder {1e6 * inside / steps:.0f} us per request-step "
              f"({100 * inside / off:.1f}% of the untraced run); {size / 1024:.1f} KiB of JSON per request")


def _time_recorder() -> dict[str, float]:
    """Accumulate the seconds spent in TraceRecorder.record and .build."""
    from dengine.trace import TraceRecorder

    total = {"seconds": 0.0}
    for name in ("record", "build"):
        method = getattr(TraceRecorder, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                total["seconds"] += time.perf_counter() - start

        setattr(TraceRecorder, name, timed)
    return total


if __name__ == "__main__":
    main()
