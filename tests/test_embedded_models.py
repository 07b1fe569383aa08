"""The shipped checkpoints: real folder formats, the default model, and they solve held-out problems."""

from __future__ import annotations

import json

import pytest

from dengine import LLM, SamplingParams
from dengine.assets import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_model
from dengine.tasks import check_answer, split_problems

MAX_BYTES = 40 * 1024 * 1024  # both checkpoints together (the budget)


def test_both_embedded_models_ship_in_the_real_formats():
    total = 0
    for name, family in (("llada-reverse", "llada"), ("dream-reverse", "dream")):
        folder = EMBEDDED_MODELS[name]
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"].lower() == family, name  # Dream writes "Dream", as the real one
        for required in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "generation_config.json", "README.md"):
            assert (folder / required).is_file(), f"{name} lacks {required}"
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert total <= MAX_BYTES
    assert resolve_model(None) == EMBEDDED_MODELS[DEFAULT_MODEL] == EMBEDDED_MODELS["llada-reverse"]


@pytest.fixture(scope="module")
def default_llm():
    return LLM()  # no model argument: the embedded LLaDA-format model


@pytest.mark.parametrize("name", ["llada-reverse", "dream-reverse"])
def test_embedded_models_solve_held_out_problems(name, default_llm):
    llm = default_llm if name == DEFAULT_MODEL else LLM(name)
    assert llm.engine.config.model_type == name.split("-")[0]
    _, problems = split_problems(0, 8)
    params = SamplingParams(gen_length=128, block_length=32, steps=128, cache_policy="none")
    outputs = llm.chat([[{"role": "user", "content": p.question}] for p in problems], params, use_tqdm=False)
    solved = [check_answer(p, o.text) for p, o in zip(problems, outputs)]
    assert sum(solved) >= 7, [(p.question, o.text) for p, o in zip(problems, outputs)]
