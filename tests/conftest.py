"""Shared fixtures: a fresh random seed per run (reported, and settable with DENGINE_TEST_SEED)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SEED = int(os.environ.get("DENGINE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"dengine test seed: {SEED} (rerun with DENGINE_TEST_SEED={SEED})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed again at the end (`-q` hides the header), so a failure found in CI can be replayed."""
    terminalreporter.write_line(pytest_report_header(config))


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the run's seed, so every run draws fresh random inputs."""
    value = (SEED + sum(map(ord, request.node.nodeid))) % 2**31
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Tiny LLaDA and Dream checkpoints with sharp attention and outputs, so caching changes tokens."""
    from checkpoints import write_checkpoint

    return {
        family: write_checkpoint(tmp_path_factory.mktemp(family), family, seed=SEED, head_scale=4.0, attn_scale=6.0)[0]
        for family in ("llada", "dream")
    }


@pytest.fixture(scope="session")
def chat_folders(tmp_path_factory):
    """Tiny LLaDA and Dream checkpoints with the embedded models' tokenizer and chat templates (2 training
    steps: the weights are near random, the formats and text path are the real ones).

    Two steps on EOS-padded answers leave some seeds' models answering every prompt with EOS first (about one
    model in seven), which the serving tests cannot use: they need text to stream, resume and abort. The
    fixture keeps the first seed from the run's own whose model answers every `Add: aX bY` prompt, raw and
    through the chat template, with text in its first block, greedy and sampled."""
    from dengine import LLM, SamplingParams
    from dengine.training import train

    prompts = [f"Add: a{x} b{y}" for x in range(1, 10) for y in range(1, 10)]
    probes = [SamplingParams(gen_length=8, block_length=8, temperature=t, seed=s) for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    out = {}
    for family in ("llada", "dream"):
        for attempt in range(20):
            folder = tmp_path_factory.mktemp(f"{family}-chat")
            train.main(["--family", family, "--out", str(folder), "--steps", "2", "--warmup", "1", "--batch-size", "2",
                        "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
                        "--gen-length", "128", "--seed", str((SEED + attempt) % 1000)])
            llm = LLM(str(folder))
            answers = [o for params in probes for o in llm.generate(prompts, params, use_tqdm=False)]
            answers += [o for params in probes
                        for o in llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)]
            if all(o.text for o in answers):
                out[family] = folder
                break
        else:
            raise RuntimeError(f"no {family} chat model answering with text in 20 seeds from {SEED % 1000}")
    return out
