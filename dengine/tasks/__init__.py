"""Synthetic tasks with exactly checkable answers, used to train and evaluate the embedded models.

A task is registered by name with its problem generator, a fixed held-out seed and its natural decoding
settings; an embedded model's folder names the task it was trained on (`task.json`), so the accuracy
harness, the policy table, the calibration script and the main job need no task flag.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator, Protocol

from dengine.tasks.digit_reversal import HELD_OUT_SEED, ReversalProblem, check_answer, random_problem
from dengine.tasks.sudoku import SudokuGenerator, SudokuProblem, SudokuShape
from dengine.tasks.sudoku_chain import SudokuChainGenerator, SudokuChainProblem

TASK_FILE = "task.json"
UNTASKED_LENGTHS = (128, 32)  # gen_length, block_length for a checkpoint that names no task


class Problem(Protocol):
    """What every task's problems offer: the prompt, a reference answer, an exact checker, an identity."""

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...

    @property
    def key(self) -> Hashable: ...

    def check(self, text: str) -> bool: ...


@dataclass(frozen=True)
class Task:
    """A registered task: generator, held-out split, natural decoding settings and what an answer looks like."""

    name: str
    summary: str
    answer_format: str  # one line for people reading the answers
    make_problem: Callable[[random.Random], Problem]
    held_out_seed: int
    gen_length: int
    block_length: int
    sampler: str = "one-token"  # the sampler it is evaluated with (dengine.bench.policies.sampler_params)
    question_pattern: str = ""  # a regular expression every question of the task matches in full
    main_job_problems: int = 500  # held-out problems `python -m dengine` decodes by default (~1-2 min on 2 cores)

    def recognizes(self, question: str) -> bool:
        """True iff question reads like one of the task's (a model trained on it answers nothing else)."""
        return re.fullmatch(self.question_pattern, question.strip()) is not None

    @property
    def example(self) -> str:
        """The first held-out question: what a prompt for a model trained on this task looks like."""
        return self.held_out(1)[0].question

    def generate(self, count: int, seed: int) -> list[Problem]:
        """count problems from a generator seeded with seed."""
        rng = random.Random(seed)
        return [self.make_problem(rng) for _ in range(count)]

    def held_out(self, count: int) -> list[Problem]:
        """The first count problems of the fixed held-out split (a prefix of any larger count)."""
        return self.generate(count, self.held_out_seed)

    def training_stream(self, seed: int, held_out: int = 500) -> Iterator[Problem]:
        """Endless seeded training problems, never equal to one of the first held_out held-out problems."""
        excluded = {p.key for p in self.held_out(held_out)}
        rng = random.Random(seed)
        while True:
            problem = self.make_problem(rng)
            if problem.key not in excluded:
                yield problem


TASKS: dict[str, Task] = {
    "digit-reversal": Task(
        name="digit-reversal",
        summary="reverse a 6-digit number, moving one digit per line of written work",
        answer_format="each line is 'digits left|digits moved;', the result follows '=>'",
        make_problem=random_problem,
        held_out_seed=HELD_OUT_SEED,
        gen_length=128,
        block_length=32,
        question_pattern=r"Reverse the digits of \d{6}",
    ),
    "sudoku4": Task(
        name="sudoku4",
        summary="complete a 4x4 sudoku from 3 to 7 givens (most puzzles have several valid completions)",
        answer_format="rows of the grid separated by '/'; any valid completion that keeps the givens is right",
        make_problem=SudokuGenerator(SudokuShape(2, 2), min_givens=3, max_givens=7),
        held_out_seed=20261201,
        gen_length=24,
        block_length=24,
        question_pattern=r"Complete the sudoku [.1-4]{4}(/[.1-4]{4}){3}",
    ),
    "sudoku-chain": Task(
        name="sudoku-chain",
        summary="complete a 4x4 sudoku, then write 11 more, each starting from the bottom band (last two rows) of "
                "the one before and completing it",
        answer_format="12 grids separated by ';' (rows by '/'); the first any valid completion of the puzzle, each "
                      "later one any valid sudoku whose top band is the previous grid's bottom band",
        make_problem=SudokuChainGenerator(),
        held_out_seed=20261205,
        gen_length=256,
        block_length=32,
        question_pattern=r"Chain of the sudoku [.1-4]{4}(/[.1-4]{4}){3}",
        main_job_problems=12,  # 239-token answers one token a step: about 5 s each exact on 2 cores
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_of_model(folder: str | Path) -> Task:
    """The task a checkpoint folder names in its task.json (the embedded models all do)."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise ValueError(f"{folder} names no task (no {TASK_FILE}); pass the task explicitly "
                         f"(one of: {', '.join(sorted(TASKS))})")
    return get_task(json.loads(path.read_text())["task"])


def task_of_folder(folder: str | Path) -> Task | None:
    """The task a checkpoint folder names, or None for a folder without task.json (a real checkpoint)."""
    return task_of_model(folder) if (Path(folder) / TASK_FILE).is_file() else None


def generation_lengths(task: Task | None, gen_length: int | None = None,
                       block_length: int | None = None) -> tuple[int, int]:
    """gen_length and block_length: the ones given, else the task's, else (no task) 128 and 32."""
    default_gen, default_block = (task.gen_length, task.block_length) if task else UNTASKED_LENGTHS
    return gen_length or default_gen, block_length or default_block


def write_task_file(folder: Path, task: Task) -> None:
    (folder / TASK_FILE).write_text(json.dumps({"task": task.name}, indent=2) + "\n")


__all__ = ["TASKS", "Problem", "ReversalProblem", "SudokuChainGenerator", "SudokuChainProblem", "SudokuGenerator", "SudokuProblem", "SudokuShape", "Task",
           "check_answer", "generation_lengths", "get_task", "task_of_folder", "task_of_model", "write_task_file"]
