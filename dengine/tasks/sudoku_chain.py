"""Sudoku chain: solve a 4x4 sudoku, then write a chain of grids, each derived from the one before it.

    question: "Chain 12 grids of the sudoku .12./2.../.3../4.31"
    answer:   "3124/2413/1342/4231;4231/3124/2413/1342;1342/4231/3124/2413;..."   (12 grids)

The first grid is any valid completion of the puzzle (most puzzles have several, as in `sudoku4`); every
later grid is the grid before it with each digit d replaced by d mod 4 + 1 (a relabelling, so every grid
of the chain is a valid sudoku). The answer is 12 grids of 19 characters separated by ';': 239 tokens in
256 generated positions (8 blocks of 32), the setting of the EntropyCache paper's headline.

Why it is the long task where a cache can err: the first grid settles its uncertainty through the commits
of its peers (as `sudoku4` does), and every later token is a function of a token committed 20 positions
earlier, often in an earlier block. Decoding runs left to right along the chain, and a step that reads a
committed token's key and value as they were while it was still masked copies the wrong digit, which
every later grid then inherits: the checker rejects any break in the chain.

The prompt names the number of grids. Held-out problems always ask for 12; training problems ask for 1 to
12 (uniformly). Why: with 12 copies of every cell in an answer, a uniformly masked training answer almost
always shows some copy of a cell, so the model would rarely practise what decoding needs first, solving
the puzzle from the prompt alone (every copy masked has probability 1/13 over the mask ratio); short
chains give that practice (as `sudoku4` does), long ones the copying.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dengine.tasks.sudoku import SudokuGenerator, SudokuProblem, SudokuShape

GRID_SEPARATOR = ";"
CHAIN_LENGTH = 12  # grids in an answer: 12 * 19 + 11 = 239 tokens


def relabel(values: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The next grid of the chain: every digit d becomes d mod size + 1."""
    return tuple(v % size + 1 for v in values)


@dataclass(frozen=True)
class SudokuChainProblem:
    """A sudoku puzzle whose answer is a chain of CHAIN_LENGTH grids, the first a completion of the puzzle."""

    puzzle: SudokuProblem
    chain_length: int = CHAIN_LENGTH

    @property
    def shape(self) -> SudokuShape:
        return self.puzzle.shape

    @property
    def key(self) -> tuple[int, ...]:
        return self.puzzle.key

    @property
    def question(self) -> str:
        return f"Chain {self.chain_length:02d} grids of the sudoku " + self.shape.render(self.puzzle.givens)

    def chain_from(self, first: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The grids of the chain that starts with first."""
        grids = [first]
        for _ in range(self.chain_length - 1):
            grids.append(relabel(grids[-1], self.shape.size))
        return grids

    @property
    def answer(self) -> str:
        """The chain of the grid the puzzle was cut from (the training target)."""
        return GRID_SEPARATOR.join(self.shape.render(g) for g in self.chain_from(self.puzzle.solution))

    def check(self, text: str) -> bool:
        """True iff text is chain_length grids, the first a valid completion and each the relabelled previous."""
        parts = text.strip().split(GRID_SEPARATOR)
        if len(parts) != self.chain_length:
            return False
        first = self.shape.parse(parts[0])
        if first is None or not self.puzzle.check(parts[0]):
            return False
        return [self.shape.parse(p) for p in parts] == self.chain_from(first)


@dataclass(frozen=True)
class SudokuChainGenerator:
    """Random sudoku-chain problems: a sudoku4 puzzle (3 to 7 givens) and a chain of min_length..max_length
    grids (held out: always CHAIN_LENGTH)."""

    puzzles: SudokuGenerator = field(default_factory=lambda: SudokuGenerator(SudokuShape(2, 2), 3, 7))
    min_length: int = CHAIN_LENGTH
    max_length: int = CHAIN_LENGTH

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length <= 99:
            raise ValueError(f"chain lengths must satisfy 1 <= min <= max <= 99, got {self.min_length}..{self.max_length}")

    def __call__(self, rng: random.Random) -> SudokuChainProblem:
        puzzle = self.puzzles(rng)
        length = self.max_length if self.min_length == self.max_length else rng.randint(self.min_length, self.max_length)
        return SudokuChainProblem(puzzle, length)
