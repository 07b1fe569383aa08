"""The shipped checkpoints: real folder formats, the default model, and they solve held-out problems."""

from __future__ import annotations

import json

import pytest

from dengine import LLM, SamplingParams
from dengine.assets import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_model
from dengine.tasks import task_of_model

MAX_BYTES = 25 * 1024 * 1024  # per checkpoint folder
# held-out problems decoded per model, and how many must be right with exact decoding (one token a step)
SOLVED = {"digit-reversal": (8, 7), "sudoku4": (32, 28), "sudoku-chain": (8, 7)}


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_embedded_models_ship_in_the_real_formats(name):
    folder = EMBEDDED_MODELS[name]
    family = name.split("-")[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"].lower() == family, name  # Dream writes "Dream", as the real one
    for required in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                     "README.md", "task.json"):
        assert (folder / required).is_file(), f"{name} lacks {required}"
    assert sum(f.stat().st_size for f in folder.iterdir()) <= MAX_BYTES
    card = (folder / "README.md").read_text()
    assert task_of_model(folder).name in card and "python -m dengine.training.train" in card


def test_the_default_model_is_the_main_jobs():
    assert resolve_model(None) == EMBEDDED_MODELS[DEFAULT_MODEL] == EMBEDDED_MODELS["llada-sudoku"]


@pytest.fixture(scope="module")
def default_llm():
    return LLM()  # no model argument: the default embedded model


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_embedded_models_solve_held_out_problems(name, default_llm):
    llm = default_llm if name == DEFAULT_MODEL else LLM(name)
    assert llm.engine.config.model_type == name.split("-")[0]
    task = task_of_model(EMBEDDED_MODELS[name])
    count, required = SOLVED[task.name]
    problems = task.held_out(count)
    params = SamplingParams(gen_length=task.gen_length, block_length=task.block_length, tokens_per_step=1,
                            cache_policy="none")
    outputs = llm.chat([[{"role": "user", "content": p.question}] for p in problems], params, use_tqdm=False)
    solved = [p.check(o.text) for p, o in zip(problems, outputs)]
    assert sum(solved) >= required, [(p.question, o.text) for p, o in zip(problems, outputs)]


@pytest.mark.parametrize("name", ["llada-8b", "GSAI-ML/LLaDA-8B-Instruct"])
def test_unknown_model_names_list_the_embedded_ones_and_say_nothing_is_downloaded(name):
    with pytest.raises(ValueError, match=r"neither a local checkpoint folder nor an embedded model \(.*llada-sudoku"
                                         r".*never downloads hub ids"):
        LLM(name)
