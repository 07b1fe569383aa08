"""The long task (`sudoku-chain`): generator, checker, held-out split, and a solved example by hand."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripts import load_script

from dengine.tasks import SudokuChainGenerator, SudokuChainProblem, get_task
from dengine.tasks.sudoku import SudokuProblem, SudokuShape
from dengine.tasks.sudoku_chain import CHAIN_LENGTH, carried_band

CHAIN = get_task("sudoku-chain")
SHAPE = SudokuShape(2, 2)
seeds = st.integers(0, 2**32 - 1)


def _grid(text: str) -> tuple[int, ...]:
    return SHAPE.parse(text)


def test_a_solved_example_by_hand():
    givens = (0, 1, 2, 0, 2, 0, 0, 0, 0, 3, 0, 0, 4, 0, 3, 1)
    first = _grid("3124/2413/1342/4231")
    # each next grid starts with the previous one's last two rows; its last two rows are one of two choices
    chain = [first]
    for _ in range(CHAIN_LENGTH - 1):
        top = chain[-1][8:]
        options = [g for g in (top + top[4:] + top[:4], top + (top[5], top[4], top[7], top[6]) +
                               (top[1], top[0], top[3], top[2])) if SHAPE.is_solution(g)]
        chain.append(options[len(chain) % len(options)])
    problem = SudokuChainProblem(SudokuProblem(givens, first, SHAPE), tuple(chain))
    assert problem.question == "Chain of the sudoku .12./2.../.3../4.31"
    text = problem.answer
    assert text.startswith("3124/2413/1342/4231;1342/4231/") and len(text) == 12 * 19 + 11 and problem.check(text)
    grids = text.split(";")
    assert not problem.check(";".join(grids[:-1])), "a chain one grid short"
    assert not problem.check(text + ";" + grids[-1]), "a chain one grid long"
    moved = list(grids)
    moved[5] = grids[5][10:] + "/" + grids[5][:9]  # a valid grid, but its top band is not the one carried
    assert SHAPE.is_solution(_grid(moved[5])) and not problem.check(";".join(moved))
    wrong = list(grids)
    wrong[0] = "4213/1342/3124/2431"  # a valid grid that drops the givens
    assert SHAPE.is_solution(_grid(wrong[0])) and not problem.check(";".join(wrong))


@settings(deadline=None, max_examples=40)
@given(seeds)
def test_every_generated_chain_checks_and_carries_its_bands(seed):
    problem = SudokuChainGenerator()(random.Random(seed))
    assert problem.check(problem.answer) and problem.check(problem.answer + "\n")
    grids = [SHAPE.parse(g) for g in problem.answer.split(";")]
    assert len(grids) == CHAIN_LENGTH and all(SHAPE.is_solution(g) for g in grids)
    assert all(a[8:] == b[:8] for a, b in zip(grids, grids[1:]))
    assert all(SHAPE.count_solutions(carried_band(a, SHAPE), 10) in (2, 4) for a in grids), \
        "every next grid holds a genuine choice"
    assert problem.question.startswith("Chain of the sudoku ") and len(problem.question) == 20 + 19


@settings(deadline=None, max_examples=40)
@given(seeds, st.data())
def test_any_valid_choice_is_accepted_and_any_break_rejected(seed, data):
    problem = SudokuChainGenerator()(random.Random(seed))
    grids = list(problem.chain)
    index = data.draw(st.integers(1, CHAIN_LENGTH - 1))
    others = [g for g in _completions(carried_band(grids[index - 1], SHAPE)) if g != grids[index]]
    chosen = data.draw(st.sampled_from(others))  # another valid choice, then a chain continued from it
    rng = random.Random(seed)
    rechained = grids[:index] + [chosen]
    while len(rechained) < CHAIN_LENGTH:
        rechained.append(SHAPE.random_grid(rng, carried_band(rechained[-1], SHAPE)))
    assert problem.check(";".join(SHAPE.render(g) for g in rechained))
    text = problem.answer
    cell = data.draw(st.integers(0, len(text) - 1).filter(lambda i: text[i] in "1234"))
    broken = text[:cell] + data.draw(st.sampled_from([d for d in "1234" if d != text[cell]])) + text[cell + 1:]
    assert not problem.check(broken)


def _completions(givens: tuple[int, ...]) -> list[tuple[int, ...]]:
    found = set()
    for seed in range(200):
        found.add(SHAPE.random_grid(random.Random(seed), givens))
    return sorted(found)


def test_random_grid_keeps_givens_and_refuses_impossible_ones():
    band = carried_band(_grid("3124/2413/1342/4231"), SHAPE)
    assert set(_completions(band)) == {g for g in _completions(band) if g[:8] == (1, 3, 4, 2, 4, 2, 3, 1)}
    assert len(_completions(band)) == SHAPE.count_solutions(band, 10)
    with pytest.raises(ValueError, match="no completion"):
        SHAPE.random_grid(random.Random(0), (1, 1) + (0,) * 14)


def test_the_held_out_split_is_fixed_and_the_lengths_fit():
    assert [p.answer for p in CHAIN.held_out(5)] == [p.answer for p in CHAIN.held_out(50)[:5]]
    assert CHAIN.held_out(3)[0].question == "Chain of the sudoku ..3./1.../3.1./.143"
    assert (CHAIN.gen_length, CHAIN.block_length) == (256, 32)
    assert len(CHAIN.held_out(1)[0].answer) + 1 <= CHAIN.gen_length
    held = {p.key for p in CHAIN.held_out(500)}
    stream = CHAIN.training_stream(seed=0)
    assert all(next(stream).key not in held for _ in range(300))


def test_first_grid_replay_counts_by_hand():
    """benchmarks/chain_first_grid.py: a crafted trace of a puzzle with several completions, replayed."""
    script = load_script("benchmarks/chain_first_grid.py")

    def agreed(p, grids):  # blank cells every completion fills alike
        return [c for c in range(16) if p.puzzle.givens[c] == 0 and len({g[c] for g in grids}) == 1]

    problem, grids = next((p, g) for p in CHAIN.held_out(100)
                          for g in [list(SHAPE.solutions(p.puzzle.givens))] if len(g) >= 2 and agreed(p, g))
    assert all(problem.puzzle.check(SHAPE.render(g)) for g in grids)
    assert len(grids) == problem.puzzle.num_solutions()
    split = next(c for c in range(16) if len({g[c] for g in grids}) > 1)  # a cell the completions disagree on
    fixed = agreed(problem, grids)[0]
    offset = {cell: offset for offset, cell in script.first_grid_cells(SHAPE).items()}
    prompt = [0] * 7

    def commit(cell, value, confidence=0.95):
        return SimpleNamespace(position=len(prompt) + offset[cell], text=str(value), confidence=confidence)

    chosen = grids[0]
    other = next(v for v in range(1, 5) if v != chosen[split])
    share = sum(g[split] == chosen[split] for g in grids) / len(grids)
    steps = [SimpleNamespace(commits=[commit(fixed, chosen[fixed]), commit(split, chosen[split])]),
             SimpleNamespace(commits=[commit(split, other, 0.4)]),  # the same cell again, another value: impossible
             SimpleNamespace(commits=[SimpleNamespace(position=len(prompt) + 40, text="3", confidence=1.0)])]  # not grid 0
    trace = SimpleNamespace(prompt_token_ids=prompt, steps=steps, text=SHAPE.render(chosen) + ";1234")
    counts = script.replay(problem, trace, 0.9)
    assert counts["commits"] == 3
    assert counts["parallel commits under the threshold"] == (share < 0.9)  # the fixed cell's share is 1
    assert counts["impossible commits"] == counts["impossible commits, unsure, alone"] == 1
    steps[1].commits = [commit(split, other, 0.9), commit(fixed, chosen[fixed])]  # confident, beside another
    counts = script.replay(problem, trace, 0.9)
    assert counts["impossible commits"] == counts["impossible commits, confident, parallel"] == 1
    assert counts["impossible commits, unsure, alone"] == 0
    assert counts["valid first grids"] == 1 and counts["invalid first grids"] == 0
    trace.text = "1111/2222/3333/4444;"
    assert script.replay(problem, trace, 0.9)["invalid first grids"] == 1
    assert counts["same-step conflicts"] == 0 and counts["impossible commits, grid already wrong"] == 0
    # two commits each agreeing with a completion, but with no completion together: a same-step conflict,
    # and a commit after it is impossible only because the grid is already wrong
    a, b, cell = next((a, b, c) for a in grids for b in grids for c in range(16)
                      if c != split and not any(g[split] == a[split] and g[c] == b[c] for g in grids))
    steps[:2] = [SimpleNamespace(commits=[commit(split, a[split]), commit(cell, b[cell])]),
                 SimpleNamespace(commits=[commit(fixed, chosen[fixed])])]
    counts = script.replay(problem, trace, 0.9)
    assert counts["same-step conflicts"] == 1
    assert counts["impossible commits"] == counts["impossible commits, grid already wrong"] == 1
