"""lm-eval's view of an embedded task: the held-out problems as a JSONL dataset, graded by dengine's own checker.

    python examples/lm_eval/utils.py            # writes examples/lm_eval/sudoku4.jsonl (500 held-out puzzles)
    lm_eval run --model local-chat-completions --apply_chat_template --include_path examples/lm_eval \
        --tasks dengine_sudoku4 --model_args model=llada-sudoku,base_url=http://127.0.0.1:8000/v1/chat/completions

(run from the repository root, with `dengine serve` running). A Sudoku puzzle usually has several valid
completions, so an exact match against one reference grid would mark right answers wrong: lm-eval's metric
here is `acc` from `process_results`, the task's own check (a valid grid that keeps every given), as
`dengine bench accuracy` grades.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from dengine.tasks import get_task

TASK = "sudoku4"
COUNT = 500


@functools.cache
def problems() -> list:
    return get_task(TASK).held_out(COUNT)


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """lm-eval's hook: 1 if the answer is a correct completion of the doc's puzzle."""
    problem = problems()[doc["index"]]
    assert problem.question == doc["question"], "the data file was written from another version of the task"
    return {"acc": int(problem.check(results[0]))}


if __name__ == "__main__":
    out = Path(__file__).with_name(f"{TASK}.jsonl")
    with out.open("w") as f:
        for index, problem in enumerate(problems()):
            f.write(json.dumps({"index": index, "question": problem.question}) + "\n")
    print(f"wrote {COUNT} problems to {out}")
