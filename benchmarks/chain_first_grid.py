"""How calibrated a chain model's parallel commits of its first grid are, against the puzzle's true odds.

    python benchmarks/chain_first_grid.py --model llada-chain --n 100 --threshold 0.9

The first grid of a `sudoku-chain` answer completes the prompt's puzzle, decided from the prompt alone, and
is where threshold decoding fails on the chain models. A puzzle often has several completions; the training
target is a uniformly random one, so a calibrated model's probability of a cell's value is the share of the
completions still consistent with what is committed that have it. This decodes the first n held-out
problems with the engine (traced) and replays each trace's first-grid commits in order, counting

  * commits made in a step that committed several tokens with a true probability under the threshold (the
    model was more confident than the puzzle allows, and a second token decided in the same step could
    come from another completion),
  * commits with true probability 0 (no completion of the puzzle agrees with what was already committed),
    split by the model's confidence (at or above the threshold: confidently wrong; under it: a step that
    reached no threshold commits its best guess alone) and by whether the step committed several tokens,
  * steps whose commits are each consistent with what was committed before but not with each other (two
    confident cells from different completions: a same-step conflict), and the impossible commits made
    once the grid was already wrong (after a conflict or an impossible commit no completion agrees with
    anything committed, so those count consequences, not causes),
  * first grids that are not a completion of the puzzle.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from dengine import LLM, SamplingParams
from dengine.bench.accuracy import model_task
from dengine.tasks.sudoku import SudokuShape
from dengine.tasks.sudoku_chain import GRID_SEPARATOR


def first_grid_cells(shape: SudokuShape) -> dict[int, int]:
    """Answer offset -> cell index, for the first grid as `shape.render` writes it."""
    offsets = [i for i, char in enumerate(shape.render((1,) * shape.cells)) if char.isdigit()]
    return {offset: cell for cell, offset in enumerate(offsets)}


def replay(problem, trace, threshold: float) -> Counter:
    """Counts for one decoded problem (see the module's docstring)."""
    shape, counts = problem.shape, Counter()
    start = len(trace.prompt_token_ids)
    cells = first_grid_cells(shape)
    consistent = list(shape.solutions(problem.puzzle.givens))
    for step in trace.steps:
        chosen = [(cells[c.position - start], int(c.text) if c.text and c.text.isdigit() else None, c.confidence)
                  for c in step.commits if c.position - start in cells]
        parallel = len(step.commits) > 1
        already = not consistent  # an earlier commit already left no completion
        shares = [sum(g[cell] == value for g in consistent) / len(consistent) if consistent else 0.0
                  for cell, value, _ in chosen]
        for (cell, value, confidence), share in zip(chosen, shares):
            counts["commits"] += 1
            if parallel and share < threshold:
                counts["parallel commits under the threshold"] += 1
            if share == 0:
                counts["impossible commits"] += 1
                sure = "confident" if confidence >= threshold else "unsure"
                counts[f"impossible commits, {sure}, {'parallel' if parallel else 'alone'}"] += 1
                if already:
                    counts["impossible commits, grid already wrong"] += 1
        for cell, value, _ in chosen:  # the step's commits condition the next step, not each other
            consistent = [g for g in consistent if g[cell] == value]
        if chosen and all(shares) and not already and not consistent:
            counts["same-step conflicts"] += 1
    first = (trace.text or "").strip().split(GRID_SEPARATOR)[0]
    counts["valid first grids" if problem.puzzle.check(first) else "invalid first grids"] += 1
    return counts


def main(argv: list[str] | None = None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-chain")
    parser.add_argument("--n", type=int, default=100, help="held-out problems")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    task = model_task(args.model, None)
    if task.name != "sudoku-chain":
        parser.error(f"{args.model} is trained on {task.name}, not sudoku-chain")
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.batch_size)
    problems = task.held_out(args.n)
    params = SamplingParams(gen_length=task.gen_length, block_length=task.block_length, threshold=args.threshold,
                            stop_at_eos=True, trace=True)
    outputs = llm.chat([[{"role": "user", "content": p.question}] for p in problems], params, use_tqdm=False)
    total = Counter()
    for problem, output in zip(problems, outputs):
        total += replay(problem, output.trace, args.threshold)
    print(json.dumps({"model": str(args.model), "n": args.n, "threshold": args.threshold, **total}, indent=1))
    return total


if __name__ == "__main__":
    main()
