"""The long task (`sudoku-chain`): generator, checker, held-out split, and a solved example by hand."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dengine.tasks import SudokuChainGenerator, SudokuChainProblem, get_task
from dengine.tasks.sudoku import SudokuProblem, SudokuShape
from dengine.tasks.sudoku_chain import CHAIN_LENGTH, relabel

CHAIN = get_task("sudoku-chain")
seeds = st.integers(0, 2**32 - 1)


def test_a_solved_example_by_hand():
    shape = SudokuShape(2, 2)
    solution = (3, 1, 2, 4, 2, 4, 1, 3, 1, 3, 4, 2, 4, 2, 3, 1)
    givens = (0, 1, 2, 0, 2, 0, 0, 0, 0, 3, 0, 0, 4, 0, 3, 1)
    problem = SudokuChainProblem(SudokuProblem(givens, solution, shape))
    assert problem.question == "Chain 12 grids of the sudoku .12./2.../.3../4.31"
    grids = problem.answer.split(";")
    assert grids[:3] == ["3124/2413/1342/4231", "4231/3124/2413/1342", "1342/4231/3124/2413"]
    assert grids[4] == grids[0] and len(grids) == CHAIN_LENGTH == 12  # four relabellings come back round
    assert len(problem.answer) == 12 * 19 + 11 and problem.check(problem.answer)
    # another valid completion of the same puzzle starts another valid chain
    other = "3124/2413/1342/4231".replace("1", "x").replace("4", "1").replace("x", "4")  # 1 <-> 4: breaks givens
    assert not problem.check(";".join([other, *grids[1:]]))
    assert not problem.check(";".join(grids[:-1])), "a chain one grid short"
    assert not problem.check(problem.answer + ";" + grids[0]), "a chain one grid long"
    broken = list(grids)
    broken[7] = broken[7][:-1] + ("1" if broken[7][-1] != "1" else "2")
    assert not problem.check(";".join(broken)), "one digit wrong deep in the chain"
    assert not problem.check(";".join([grids[0], grids[0], *grids[2:]])), "a grid copied, not relabelled"


@settings(deadline=None, max_examples=60)
@given(seeds)
def test_every_generated_chain_checks_and_is_a_chain_of_valid_grids(seed):
    problem = SudokuChainGenerator()(random.Random(seed))
    assert problem.check(problem.answer) and problem.check(problem.answer + "\n")
    shape = problem.shape
    grids = [shape.parse(g) for g in problem.answer.split(";")]
    assert all(shape.is_solution(g) for g in grids)
    assert all(relabel(a, 4) == b for a, b in zip(grids, grids[1:]))
    assert problem.question.startswith("Chain 12 grids of the sudoku ") and len(problem.question) == 29 + 19


@settings(deadline=None, max_examples=40)
@given(seeds, st.data())
def test_any_valid_first_grid_is_accepted_and_any_break_rejected(seed, data):
    problem = SudokuChainGenerator()(random.Random(seed))
    shape = problem.shape
    swapped = {1: 2, 2: 1}  # relabelling a solution gives another valid grid, right when no given is 1 or 2
    first = tuple(swapped.get(v, v) for v in problem.puzzle.solution)
    text = ";".join(shape.render(g) for g in problem.chain_from(first))
    assert problem.check(text) == all(g not in (1, 2) for g in problem.puzzle.givens)
    grids = problem.answer.split(";")
    index = data.draw(st.integers(0, CHAIN_LENGTH - 1))
    cell = data.draw(st.integers(0, 18).filter(lambda i: i % 5 != 4))  # a digit, not a '/'
    digit = grids[index][cell]
    grids[index] = grids[index][:cell] + data.draw(st.sampled_from([d for d in "1234" if d != digit])) + \
        grids[index][cell + 1:]
    assert not problem.check(";".join(grids))


def test_the_held_out_split_is_fixed_and_the_lengths_fit():
    assert [p.question for p in CHAIN.held_out(5)] == [p.question for p in CHAIN.held_out(50)[:5]]
    assert CHAIN.held_out(3)[0].question == "Chain 12 grids of the sudoku ..3./1.../3.1./.143"
    assert (CHAIN.gen_length, CHAIN.block_length) == (256, 32)
    assert len(CHAIN.held_out(1)[0].answer) + 1 <= CHAIN.gen_length
    assert all(p.chain_length == CHAIN_LENGTH for p in CHAIN.held_out(100))
    held = {p.key for p in CHAIN.held_out(500)}
    stream = CHAIN.training_stream(seed=0)
    training = [next(stream) for _ in range(600)]
    assert all(p.key not in held for p in training)
    assert {p.chain_length for p in training} == set(range(1, CHAIN_LENGTH + 1)), "training asks for 1 to 12 grids"
    for problem in training[:50]:  # the prompt names the count; the answer has exactly that many grids
        count = int(problem.question.split()[1])
        assert count == len(problem.answer.split(";")) == problem.chain_length and problem.check(problem.answer)
        assert len(problem.question) == 29 + 19, "one prompt length for every count (a training batch shares it)"


def test_chain_lengths_are_validated():
    import pytest

    with pytest.raises(ValueError, match="chain lengths"):
        SudokuChainGenerator(min_length=0)
    with pytest.raises(ValueError, match="chain lengths"):
        SudokuChainGenerator(min_length=5, max_length=4)
