"""The README's Python blocks and the examples run as written against the embedded models."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from scripts import load_script

from dengine import LLMEngine, SamplingParams
from dengine.async_engine import AsyncLLMEngine
from dengine.serve.server import OpenAIServer, create_app

ROOT = Path(__file__).resolve().parent.parent
NEEDS = "# needs:"  # a block starting with this line needs what it names (a real checkpoint folder)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run_on_the_embedded_models(capsys):
    blocks = python_blocks(ROOT / "README.md")
    runnable = [b for b in blocks if not b.startswith(NEEDS)]
    assert len(runnable) >= 2, "the README shows the offline API on the embedded models"
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the point of the test
    printed = capsys.readouterr().out
    assert "Traceback" not in printed and "(right)" in printed and "(wrong)" not in printed


def test_readme_blocks_that_need_a_real_checkpoint_say_so():
    for block in python_blocks(ROOT / "README.md"):
        if "/models/" in block:
            assert block.startswith(NEEDS), block


def test_openai_client_example_gets_right_answers_from_the_embedded_model(capsys):
    engine = LLMEngine(ROOT / "dengine" / "assets" / "llada-sudoku", dtype="float32", kv_cache_memory=1 << 26,
                       block_size=8)
    server = OpenAIServer(AsyncLLMEngine(engine), "llada-sudoku", SamplingParams(gen_length=24))
    with TestClient(create_app(server)) as client:
        load_script("examples/openai_client.py").main(["--base-url", "http://testserver/v1"], http_client=client)
    printed = capsys.readouterr().out
    assert "llada-sudoku was trained on sudoku4" in printed
    assert printed.count("(right)") >= 6 and printed.count("(wrong)") <= 1, printed


def test_offline_batch_example_asks_an_embedded_model_its_task(capsys):
    load_script("examples/offline_batch.py").main(["--n", "4", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert printed.count("Complete the sudoku") == 4 and printed.count("(right)") >= 3, printed


def test_lm_eval_task_data_is_the_held_out_split_and_is_graded_by_the_tasks_checker():
    """examples/lm_eval: the shipped JSONL is what utils.py writes (it cannot go stale), and process_results grades
    with the task's own check: a valid completion right, a grid that breaks a given wrong."""
    utils = load_script("examples/lm_eval/utils.py")
    lines = (ROOT / "examples" / "lm_eval" / "sudoku4.jsonl").read_text().splitlines()
    problems = utils.problems()
    assert [json.loads(line) for line in lines] == [{"index": i, "question": p.question} for i, p in enumerate(problems)]
    doc = json.loads(lines[7])
    assert utils.process_results(doc, [problems[7].answer]) == {"acc": 1}
    wrong = problems[7].answer.replace("1", "#").replace("2", "1").replace("#", "2")  # swaps digits: breaks givens
    assert utils.process_results(doc, [wrong]) == {"acc": 0}
