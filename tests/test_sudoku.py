"""The Sudoku task (generator, checker, splits, difficulty knobs) and the task registry."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dengine.assets import EMBEDDED_MODELS
from dengine.tasks import (TASKS, SudokuGenerator, SudokuProblem, SudokuShape, generation_lengths, get_task,
                           task_of_folder, task_of_model)

SUDOKU = get_task("sudoku4")
seeds = st.integers(0, 2**32 - 1)


def _problem(seed: int, shape: SudokuShape = SudokuShape(2, 2), givens: tuple[int, int] = (3, 7)) -> SudokuProblem:
    return SudokuGenerator(shape, *givens)(random.Random(seed))


def _relabelled(problem: SudokuProblem, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The grid with two digits swapped everywhere: still a valid sudoku."""
    return tuple({1: 2, 2: 1}.get(v, v) for v in grid)


@settings(deadline=None, max_examples=80)
@given(seeds)
def test_the_checker_accepts_every_generated_solution(seed):
    problem = _problem(seed)
    assert problem.check(problem.answer) and problem.check(problem.answer + "\n")
    assert problem.check(" " + problem.answer)
    assert problem.num_solutions() >= 1
    n = problem.shape.size
    assert problem.question.startswith("Complete the sudoku ") and len(problem.answer) == n * n + n - 1
    assert 3 <= sum(1 for g in problem.givens if g) <= 7


@settings(deadline=None, max_examples=80)
@given(seeds, st.data())
def test_the_checker_rejects_near_misses(seed, data):
    problem = _problem(seed)
    shape, grid = problem.shape, list(problem.solution)
    cell = data.draw(st.integers(0, shape.cells - 1))
    changed = list(grid)
    changed[cell] = data.draw(st.sampled_from([d for d in range(1, shape.size + 1) if d != grid[cell]]))
    assert not problem.check(shape.render(tuple(changed))), "one digit changed breaks its row"
    row = cell // shape.size
    other = row * shape.size + (cell % shape.size + 1) % shape.size
    swapped = list(grid)
    swapped[cell], swapped[other] = swapped[other], swapped[cell]
    assert not problem.check(shape.render(tuple(swapped))), "two cells of a row swapped break their columns"
    relabelled = _relabelled(problem, problem.solution)
    if any(g in (1, 2) for g in problem.givens):
        assert not problem.check(shape.render(relabelled)), "a valid grid that drops a given is wrong"
    assert shape.is_solution(relabelled)
    text = problem.answer
    for bad in (text[:-1], text + "1", text.replace("/", ""), text.replace("/", "|"), text[: -shape.size - 1],
                text.replace(str(grid[0]), "0", 1), "=>" + text):
        assert not problem.check(bad), bad


def test_several_completions_are_all_accepted():
    givens = (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    shape = SudokuShape(2, 2)
    completions = [grid for grid in _all_grids(shape) if grid[0] == 1]
    assert len(completions) == shape.count_solutions(givens, limit=1000) == 288 // 4
    assert sorted(shape.solutions(givens)) == sorted(completions)
    assert shape.count_solutions(givens, limit=5) == 5
    problem = SudokuProblem(givens, completions[0], shape)
    assert all(problem.check(shape.render(grid)) for grid in completions)


def _all_grids(shape: SudokuShape) -> list[tuple[int, ...]]:
    digits = range(1, shape.size + 1)
    rows = list(itertools.permutations(digits))
    return [sum(r, ()) for r in itertools.product(rows, repeat=shape.size) if shape.is_solution(sum(r, ()))]


def test_solution_counts_by_hand():
    shape = SudokuShape(2, 2)
    assert len(_all_grids(shape)) == shape.count_solutions((0,) * 16, limit=10_000) == 288
    full = _problem(1).solution
    assert shape.count_solutions(full, limit=10) == 1
    assert shape.count_solutions((1, 1) + (0,) * 14, limit=10) == 0  # a given repeated in a row


def test_difficulty_knobs():
    six = _problem(5, SudokuShape(2, 3), (20, 24))
    assert six.shape.size == 6 and six.check(six.answer) and 20 <= sum(1 for g in six.givens if g) <= 24
    assert len(six.answer.split("/")) == 6
    rng = random.Random(0)
    few = [SudokuGenerator(min_givens=3, max_givens=3)(rng).num_solutions() for _ in range(50)]
    many = [SudokuGenerator(min_givens=10, max_givens=10)(rng).num_solutions() for _ in range(50)]
    assert sum(few) / 50 > 2 * sum(many) / 50, "fewer givens leave more valid completions"
    with pytest.raises(ValueError, match="givens range"):
        SudokuGenerator(min_givens=8, max_givens=3)
    with pytest.raises(ValueError, match="box shape"):
        SudokuShape(4, 4)
    with pytest.raises(ValueError, match="not a valid"):
        SudokuProblem((0,) * 16, (1,) * 16)


def test_splits_are_seeded_and_disjoint():
    held_out = SUDOKU.held_out(500)
    assert SUDOKU.held_out(20) == held_out[:20], "the held-out split is a prefix of any larger one"
    assert len({p.key for p in held_out}) > 450, "held-out puzzles are mostly distinct"
    keys = {p.key for p in held_out}
    stream = SUDOKU.training_stream(seed=3, held_out=500)
    training = [next(stream) for _ in range(3000)]
    assert not keys & {p.key for p in training}
    again = SUDOKU.training_stream(seed=3, held_out=500)
    assert [next(again) for _ in range(50)] == training[:50]
    other = SUDOKU.training_stream(seed=4, held_out=500)
    assert [next(other) for _ in range(50)] != training[:50]


def test_answers_fit_the_task_settings_and_the_tokenizer(tmp_path):
    from dengine.tokenizer import load_tokenizer
    from dengine.training.tokenizer import write_tokenizer

    write_tokenizer(tmp_path, "llada")
    tokenizer = load_tokenizer(tmp_path)
    for task in TASKS.values():
        assert task.gen_length % task.block_length == 0
        for problem in task.held_out(20):
            for text in (problem.question, problem.answer):
                assert len(tokenizer.encode(text, add_special_tokens=False)) == len(text)
            assert len(problem.answer) + 1 <= task.gen_length  # + end of turn
            assert problem.check(problem.answer)


def test_registry_resolves_every_embedded_model(tmp_path):
    for name, folder in EMBEDDED_MODELS.items():
        task = task_of_model(folder)
        assert task.name == json.loads((folder / "task.json").read_text())["task"]
        assert name.endswith({"digit-reversal": "reverse", "sudoku4": "sudoku", "sudoku-chain": "chain"}[task.name])
    with pytest.raises(ValueError, match="names no task"):
        task_of_model(tmp_path)
    assert task_of_folder(tmp_path) is None and task_of_folder(EMBEDDED_MODELS["dream-sudoku"]).name == "sudoku4"
    assert generation_lengths(SUDOKU) == (24, 24) and generation_lengths(SUDOKU, 48) == (48, 24)
    assert generation_lengths(None) == (128, 32) and generation_lengths(None, None, 16) == (128, 16)
    with pytest.raises(ValueError, match="unknown task 'chess'.*sudoku4"):
        get_task("chess")
