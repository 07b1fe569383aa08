"""Sudoku completion: fill a partly given grid so that every row, column and box holds each digit once.

    question: "Complete the sudoku 1.../..2./..../.3.."
    answer:   "1234/3412/2143/4321"        (any valid completion is right)

Rows are written top to bottom, separated by '/', '.' for a blank. Puzzles keep few givens, so many have
several valid completions: a cell's value is genuinely uncertain at the start of decoding and is settled
only as its row, column and box peers are committed. That is the workload an approximate KV cache can get
wrong: a peer whose committed value the cache still holds as a mask invites a duplicate digit. The checker
accepts every valid completion that keeps the givens, so exact decoding can reach 100% while a stale cache
cannot. Difficulty knobs: the box shape (2x2 for 4x4 grids, 2x3 for 6x6) and the range of givens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice

BLANK = "."
ROW_SEPARATOR = "/"


@dataclass(frozen=True)
class SudokuShape:
    """A grid of box_rows x box_cols boxes; size = box_rows * box_cols cells a side, digits 1..size."""

    box_rows: int = 2
    box_cols: int = 2

    def __post_init__(self) -> None:
        if not (1 <= self.box_rows <= 3 and 1 <= self.box_cols <= 3 and self.size >= 2):
            raise ValueError(f"box shape must be 1..3 x 1..3 with at least 2 cells, "
                             f"got {self.box_rows}x{self.box_cols}")

    @property
    def size(self) -> int:
        return self.box_rows * self.box_cols

    @property
    def cells(self) -> int:
        return self.size * self.size

    @cached_property
    def units(self) -> tuple[tuple[int, ...], ...]:
        """Every row, column and box as a tuple of cell indices."""
        n = self.size
        rows = [tuple(r * n + c for c in range(n)) for r in range(n)]
        cols = [tuple(r * n + c for r in range(n)) for c in range(n)]
        boxes = [tuple((br + r) * n + bc + c for r in range(self.box_rows) for c in range(self.box_cols))
                 for br in range(0, n, self.box_rows) for bc in range(0, n, self.box_cols)]
        return tuple(rows + cols + boxes)

    @cached_property
    def peers(self) -> tuple[frozenset[int], ...]:
        """For each cell, the other cells sharing a row, column or box with it."""
        return tuple(frozenset(i for unit in self.units if cell in unit for i in unit) - {cell}
                     for cell in range(self.cells))

    def render(self, values: tuple[int, ...]) -> str:
        """Rows of digits ('.' for 0) separated by '/'."""
        n = self.size
        text = "".join(BLANK if v == 0 else str(v) for v in values)
        return ROW_SEPARATOR.join(text[r * n:(r + 1) * n] for r in range(n))

    def parse(self, text: str) -> tuple[int, ...] | None:
        """The grid written exactly as render writes a full grid (surrounding white space allowed), else None."""
        rows = text.strip().split(ROW_SEPARATOR)
        if len(rows) != self.size or any(len(row) != self.size for row in rows):
            return None
        digits = "".join(rows)
        if not all(c.isdigit() and c.isascii() for c in digits):
            return None
        return tuple(int(c) for c in digits)

    def is_solution(self, values: tuple[int, ...]) -> bool:
        """Every cell 1..size and every unit a permutation of 1..size."""
        full = set(range(1, self.size + 1))
        return len(values) == self.cells and all({values[i] for i in unit} == full for unit in self.units)

    def candidates(self, values: list[int], cell: int) -> list[int]:
        taken = {values[p] for p in self.peers[cell]}
        return [d for d in range(1, self.size + 1) if d not in taken]

    def solutions(self, givens: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        """Every completion of the givens, lazily (backtracking, fewest candidates first)."""
        values = list(givens)
        if any(v and v in {values[p] for p in self.peers[i]} for i, v in enumerate(values)):
            return

        def search() -> Iterator[tuple[int, ...]]:
            blanks = [i for i, v in enumerate(values) if v == 0]
            if not blanks:
                yield tuple(values)
                return
            cell = min(blanks, key=lambda i: len(self.candidates(values, i)))
            for digit in self.candidates(values, cell):
                values[cell] = digit
                yield from search()
            values[cell] = 0

        yield from search()

    def count_solutions(self, givens: tuple[int, ...], limit: int) -> int:
        """How many completions the givens have, counting up to limit."""
        return sum(1 for _ in islice(self.solutions(givens), limit))

    def random_grid(self, rng: random.Random, givens: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """A random full grid (randomised backtracking fill, cell by cell), keeping givens (0 = free) if any;
        ValueError if they have no completion."""
        values = list(givens) if givens is not None else [0] * self.cells

        def fill(cell: int) -> bool:
            if cell == self.cells:
                return True
            if values[cell]:
                return values[cell] in self.candidates(values, cell) and fill(cell + 1)
            digits = self.candidates(values, cell)
            rng.shuffle(digits)
            for digit in digits:
                values[cell] = digit
                if fill(cell + 1):
                    return True
            values[cell] = 0
            return False

        if not fill(0):
            raise ValueError(f"no completion keeps the givens {givens!r}")
        return tuple(values)


@dataclass(frozen=True)
class SudokuProblem:
    """A puzzle (0 for a blank), the full grid it was cut from, and the grid's shape."""

    givens: tuple[int, ...]
    solution: tuple[int, ...]
    shape: SudokuShape = field(default_factory=SudokuShape)

    def __post_init__(self) -> None:
        if not self.shape.is_solution(self.solution):
            raise ValueError(f"solution is not a valid {self.shape.size}x{self.shape.size} sudoku: {self.solution!r}")
        if len(self.givens) != self.shape.cells or any(g not in (0, s) for g, s in zip(self.givens, self.solution)):
            raise ValueError("givens must be the solution's digits or 0 (blank), one per cell")

    @property
    def key(self) -> tuple[int, ...]:
        """What makes two problems the same question (used to keep splits disjoint)."""
        return self.givens

    @property
    def question(self) -> str:
        return "Complete the sudoku " + self.shape.render(self.givens)

    @property
    def answer(self) -> str:
        """The grid this puzzle was cut from: one valid completion (the training target)."""
        return self.shape.render(self.solution)

    def check(self, text: str) -> bool:
        """True iff text is a full grid in the answer format, a valid sudoku, and keeps every given."""
        grid = self.shape.parse(text)
        return (grid is not None and self.shape.is_solution(grid)
                and all(g in (0, v) for g, v in zip(self.givens, grid)))

    def num_solutions(self, limit: int = 1000) -> int:
        return self.shape.count_solutions(self.givens, limit)


@dataclass(frozen=True)
class SudokuGenerator:
    """Random puzzles: a random full grid, then min_givens..max_givens of its cells kept at random places."""

    shape: SudokuShape = field(default_factory=SudokuShape)
    min_givens: int = 3
    max_givens: int = 7

    def __post_init__(self) -> None:
        if not 0 <= self.min_givens <= self.max_givens <= self.shape.cells:
            raise ValueError(f"givens range must satisfy 0 <= min <= max <= {self.shape.cells}, "
                             f"got {self.min_givens}..{self.max_givens}")

    def __call__(self, rng: random.Random) -> SudokuProblem:
        solution = self.shape.random_grid(rng)
        kept = set(rng.sample(range(self.shape.cells), rng.randint(self.min_givens, self.max_givens)))
        givens = tuple(v if i in kept else 0 for i, v in enumerate(solution))
        return SudokuProblem(givens, solution, self.shape)
