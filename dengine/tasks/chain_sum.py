"""Chain sums with written work: add the 8 digits of a number, one digit per line of work.

    question: "Add the digits of 48461257"
    answer:   "00|48461257;04|8461257_;12|461257__;16|61257___;22|1257____;23|257_____;25|57______;"
              "30|7_______;37|________;=>37"

Each line holds the running sum (two digits), then the digits still to add, shifted one place left per
line and padded with '_'. Every line is 12 characters, so every token of the work depends only on tokens
a fixed distance back (the same slot of the previous line, or its sum and first digit): each step is a
local, checkable computation, the way a person writes column work. Answers are 112 characters (one
token each with the embedded tokenizer), long enough for caching to matter.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NUM_TERMS = 8
MIN_TERMS = MAX_TERMS = NUM_TERMS  # kept for callers that sample a term count
PAD = "_"
_FINAL = re.compile(r"=>(\d+)\s*$")
HELD_OUT_SEED = 20261122  # the held-out split's generator; training problems never repeat one of them


@dataclass(frozen=True)
class ChainSumProblem:
    """One problem: its digits, the prompt text, the worked answer and the final value."""

    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "Add the digits of " + "".join(str(t) for t in self.terms)

    @property
    def total(self) -> int:
        return sum(self.terms)

    @property
    def lines(self) -> list[str]:
        """The lines of work: running sum, '|', the digits left (padded to the full width), ';'."""
        width, acc, out = len(self.terms), 0, []
        for used in range(width + 1):
            rest = "".join(str(t) for t in self.terms[used:])
            out.append(f"{acc:02d}|{rest.ljust(width, PAD)};")
            if used < width:
                acc += self.terms[used]
        return out

    @property
    def answer(self) -> str:
        """The worked solution: every line of work, then '=>' and the total."""
        return "".join(self.lines) + f"=>{self.total}"


def check_answer(problem: ChainSumProblem, text: str) -> bool:
    """True iff the text ends with '=>' followed by the right total (the work itself is not graded)."""
    match = _FINAL.search(text.strip())
    return match is not None and int(match.group(1)) == problem.total


def generate_problems(count: int, seed: int) -> list[ChainSumProblem]:
    """count problems from a seeded generator: 8 digits, each 1 to 9."""
    rng = random.Random(seed)
    return [ChainSumProblem(tuple(rng.randint(1, 9) for _ in range(NUM_TERMS))) for _ in range(count)]


def split_problems(num_train: int, num_held_out: int, seed: int = 0) -> tuple[list[ChainSumProblem], list[ChainSumProblem]]:
    """Train and held-out splits; the held-out split is fixed, training problems never equal one of it."""
    held_out = generate_problems(num_held_out, HELD_OUT_SEED)
    excluded = {p.terms for p in held_out}
    train = [p for p in generate_problems(num_train + num_held_out, seed + 1) if p.terms not in excluded]
    return train[:num_train], held_out
