"""Chain sums with written work: add 6 to 8 digits left to right, showing every partial sum.

    question: "Add: 4 8 1 9 3 7"
    answer:   "04+8=12;12+1=13;13+9=22;22+3=25;25+7=32;=>32"

Every intermediate result is two digits wide, so each step is a local, checkable computation; answers
are 48 to 62 characters (one token each with the embedded tokenizer), long enough for caching to matter.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MIN_TERMS, MAX_TERMS = 6, 8
_FINAL = re.compile(r"=>(\d+)\s*$")
HELD_OUT_SEED = 20261122  # the held-out split's generator; training problems never repeat one of them


@dataclass(frozen=True)
class ChainSumProblem:
    """One problem: its operands, the prompt text, the worked answer and the final value."""

    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "Add: " + " ".join(str(t) for t in self.terms)

    @property
    def total(self) -> int:
        return sum(self.terms)

    @property
    def answer(self) -> str:
        """The worked solution: every partial sum, then '=>' and the total."""
        steps, acc = [], self.terms[0]
        for term in self.terms[1:]:
            steps.append(f"{acc:02d}+{term}={acc + term:02d};")
            acc += term
        return "".join(steps) + f"=>{acc}"


def check_answer(problem: ChainSumProblem, text: str) -> bool:
    """True iff the text ends with '=>' followed by the right total (the work itself is not graded)."""
    match = _FINAL.search(text.strip())
    return match is not None and int(match.group(1)) == problem.total


def generate_problems(count: int, seed: int) -> list[ChainSumProblem]:
    """count problems from a seeded generator: 6 to 8 terms, each 1 to 9."""
    rng = random.Random(seed)
    return [
        ChainSumProblem(tuple(rng.randint(1, 9) for _ in range(rng.randint(MIN_TERMS, MAX_TERMS))))
        for _ in range(count)
    ]


def split_problems(num_train: int, num_held_out: int, seed: int = 0) -> tuple[list[ChainSumProblem], list[ChainSumProblem]]:
    """Train and held-out splits; the held-out split is fixed, training problems never equal one of it."""
    held_out = generate_problems(num_held_out, HELD_OUT_SEED)
    excluded = {p.terms for p in held_out}
    train = [p for p in generate_problems(num_train + num_held_out, seed + 1) if p.terms not in excluded]
    return train[:num_train], held_out
