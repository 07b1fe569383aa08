"""Sudoku chain: a chain of 12 sudokus, the first completing the prompt's puzzle, each next one starting
from the bottom band of the one before.

    question: "Chain of the sudoku .12./2.../.3../4.31"
    answer:   "3124/2413/1342/4231;1342/4231/3124/2413;3124/2413/1342/4231;..."   (12 grids)

The first grid is any valid completion of the puzzle (most puzzles have several, as in `sudoku4`). Every
later grid is a valid sudoku whose top band (its first two rows) repeats the previous grid's bottom band
(its last two rows), and whose bottom band the decoder chooses: a band has two completions, so each grid
holds one genuine decision, settled by the grid's own commits. The answer is 12 grids of 19 characters
separated by ';': 239 tokens in 256 generated positions (8 blocks of 32), the setting of the EntropyCache
paper's headline.

Why it is the long task where a cache can err: every grid copies its top band from tokens committed 10 to
13 positions earlier (often in the block before) and then decides its bottom band from its own commits, as a
chain of thought alternates copying and deciding. A step that reads a committed token's key and value as
they were while it was still masked copies or decides wrongly, and the checker rejects any break in the
chain. The Sudoku models' reading of the givens depends on where the prompt starts, so the prompt prefix is
as long as `sudoku4`'s (the embedded chain models start from the Sudoku models).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dengine.tasks.sudoku import SudokuGenerator, SudokuProblem, SudokuShape

GRID_SEPARATOR = ";"
CHAIN_LENGTH = 12  # grids in an answer: 12 * 19 + 11 = 239 tokens
QUESTION_PREFIX = "Chain of the sudoku "  # as long as sudoku4's "Complete the sudoku "


def carried_band(grid: tuple[int, ...], shape: SudokuShape) -> tuple[int, ...]:
    """The givens of the next grid of a chain: grid's bottom band as the top band, the rest blank (0)."""
    band = shape.box_rows * shape.size
    return grid[-band:] + (0,) * (shape.cells - band)


@dataclass(frozen=True)
class SudokuChainProblem:
    """A sudoku puzzle and one valid chain of CHAIN_LENGTH grids for it (the training target)."""

    puzzle: SudokuProblem
    chain: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.is_chain(self.chain):
            raise ValueError("chain is not a valid chain of the puzzle")

    @property
    def shape(self) -> SudokuShape:
        return self.puzzle.shape

    @property
    def key(self) -> tuple[int, ...]:
        return self.puzzle.key

    @property
    def question(self) -> str:
        return QUESTION_PREFIX + self.shape.render(self.puzzle.givens)

    @property
    def answer(self) -> str:
        return GRID_SEPARATOR.join(self.shape.render(g) for g in self.chain)

    def is_chain(self, grids) -> bool:
        """CHAIN_LENGTH valid grids, the first keeping the puzzle's givens, each next one starting from the
        previous one's bottom band."""
        if len(grids) != CHAIN_LENGTH or any(g is None or not self.shape.is_solution(g) for g in grids):
            return False
        if any(p not in (0, v) for p, v in zip(self.puzzle.givens, grids[0])):
            return False
        return all(all(c in (0, v) for c, v in zip(carried_band(a, self.shape), b)) for a, b in zip(grids, grids[1:]))

    def check(self, text: str) -> bool:
        """True iff text is a valid chain for the puzzle, written as the answer format writes it."""
        return self.is_chain([self.shape.parse(part) for part in text.strip().split(GRID_SEPARATOR)])


@dataclass(frozen=True)
class SudokuChainGenerator:
    """Random problems: a sudoku4 puzzle (3 to 7 givens), its generating grid, then random continuations."""

    puzzles: SudokuGenerator = field(default_factory=lambda: SudokuGenerator(SudokuShape(2, 2), 3, 7))

    def __call__(self, rng: random.Random) -> SudokuChainProblem:
        puzzle = self.puzzles(rng)
        chain = [puzzle.solution]
        while len(chain) < CHAIN_LENGTH:
            chain.append(puzzle.shape.random_grid(rng, carried_band(chain[-1], puzzle.shape)))
        return SudokuChainProblem(puzzle, tuple(chain))
