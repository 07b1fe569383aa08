"""Digit reversal with written work: reverse a 6-digit number by moving one digit per line.

    question: "Reverse the digits of 418325"
    answer:   "418325|______;18325_|4_____;8325__|14____;325___|814___;25____|3814__;5_____|23814_;"
              "______|523814;=>523814"

Each line holds the digits still to move (left, padded with '_'), '|', the digits moved so far (right,
newest first, padded with '_'), ';'. Every line is 14 characters, so every token of the work is a copy
from a fixed distance back in the previous line: the left part shifts one place left, the right part one
place right, and the digit that leaves the left part becomes the right part's first. Answers are 106
characters (one token each with the embedded tokenizer), long enough for caching to matter, and one wrong
copy anywhere propagates to the final answer, so stale caches show up in accuracy.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NUM_DIGITS = 6
PAD = "_"
_FINAL = re.compile(r"=>(\d+)\s*$")
HELD_OUT_SEED = 20261122  # the held-out split's generator; training problems never repeat one of them


@dataclass(frozen=True)
class ReversalProblem:
    """One problem: its digits, the prompt text, the worked answer and the expected result."""

    digits: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.digits or any(not 0 <= d <= 9 for d in self.digits):
            raise ValueError(f"digits must be a non-empty sequence of 0..9, got {self.digits!r}")

    @property
    def key(self) -> tuple[int, ...]:
        """What makes two problems the same question (used to keep splits disjoint)."""
        return self.digits

    @property
    def question(self) -> str:
        return "Reverse the digits of " + "".join(map(str, self.digits))

    @property
    def target(self) -> str:
        """The reversed digits, as the answer's last line states them."""
        return "".join(map(str, reversed(self.digits)))

    @property
    def lines(self) -> list[str]:
        """The lines of work: digits left to move, '|', digits moved (newest first), ';'."""
        width, text = len(self.digits), "".join(map(str, self.digits))
        return [f"{text[moved:].ljust(width, PAD)}|{text[:moved][::-1].ljust(width, PAD)};"
                for moved in range(width + 1)]

    @property
    def answer(self) -> str:
        """The worked solution: every line of work, then '=>' and the reversed digits."""
        return "".join(self.lines) + "=>" + self.target

    def check(self, text: str) -> bool:
        """True iff the text ends with '=>' followed by exactly the reversed digits (the work is not graded)."""
        return check_answer(self, text)


def check_answer(problem: ReversalProblem, text: str) -> bool:
    """True iff the text ends with '=>' followed by exactly the reversed digits (the work is not graded)."""
    match = _FINAL.search(text.strip())
    return match is not None and match.group(1) == problem.target


def random_problem(rng: random.Random) -> ReversalProblem:
    return ReversalProblem(tuple(rng.randint(0, 9) for _ in range(NUM_DIGITS)))
