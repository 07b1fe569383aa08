"""Tokenizers from checkpoint folders: the real Dream tokenizer and a tokenizer.json in LLaDA's format."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from checkpoints import REAL, write_llada_tokenizer
from dengine import CheckpointError, load_tokenizer, read_model_config
from dengine.tokenizer import check_tokenizer_matches

TEXTS = [
    "Lily can run 12 kilometers per hour for 4 hours.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "unicode: café, naïve, 東京, emoji 🚀, ½ + ¼ = ¾",
    "def f(x):\n    return x ** 2  # code",
    "",
]


@pytest.fixture(scope="module")
def dream_tokenizer():
    return load_tokenizer(REAL["dream"])


def test_real_dream_tokenizer_round_trips_and_places_special_tokens(dream_tokenizer):
    tok = dream_tokenizer
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.convert_tokens_to_ids("<|mask|>") == 151666 and tok.mask_token_id == 151666
    assert tok.convert_tokens_to_ids("<|beginoftext|>") == 151665
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.eos_token_id == 151643 and tok.pad_token_id == 151643
    assert tok.encode("a<|mask|>b")[1] == 151666
    assert len(tok) == 151667
    _, config = read_model_config(REAL["dream"])
    check_tokenizer_matches(config, tok, REAL["dream"])


def test_real_dream_chat_template(dream_tokenizer):
    text = dream_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def _llada_style_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    write_llada_tokenizer(folder, TEXTS * 20, vocab_size=400)
    return folder


def test_tokenizer_json_with_llada_chat_template(tmp_path):
    tok = load_tokenizer(_llada_style_folder(tmp_path / "tok"))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "  Hi there "}], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|eot_id|>") in ids


def test_special_token_missing_from_vocabulary_is_named(tmp_path):
    folder = _llada_style_folder(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|not_in_vocab|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"eos_token '<\|not_in_vocab\|>' is not in the tokenizer's vocabulary"):
        load_tokenizer(folder)


def test_folder_without_tokenizer_and_incomplete_bpe(tmp_path):
    assert load_tokenizer(tmp_path) is None
    shutil.copy(REAL["dream"] / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt: file not found"):
        load_tokenizer(tmp_path)


def test_added_token_ids_must_match(tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(REAL["dream"] / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    spec = config["added_tokens_decoder"].pop("151666")
    config["added_tokens_decoder"]["151700"] = spec
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'<\\|mask\\|>' must have id 151700"):
        load_tokenizer(tmp_path)


def test_tokenizer_config_mismatch_is_reported(dream_tokenizer, tmp_path):
    raw = json.loads((REAL["dream"] / "config.json").read_text())
    raw["mask_token_id"] = 151665
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _, config = read_model_config(tmp_path)
    with pytest.raises(CheckpointError, match="mask_token has id 151666 but config.json says 151665"):
        check_tokenizer_matches(config, dream_tokenizer, tmp_path)


GOLDEN_LLADA_IDS = [
    126080, 126346, 3840, 126347, 198, 198, 86059, 560, 2001, 220, 16, 17, 44137, 854, 6984, 352, 220, 19,
    3871, 13, 4474, 378, 11, 1285, 9660, 220, 21, 44137, 854, 6984, 13, 2071, 1494, 44137, 560, 1285, 2001, 296,
    220, 23, 3871, 30, 126348, 126346, 598, 10450, 126347, 198, 198,
]


@pytest.mark.skipif(
    not os.environ.get("DENGINE_LLADA_TOKENIZER"),
    reason="opt-in: set DENGINE_LLADA_TOKENIZER to a folder holding LLaDA-8B-Instruct's tokenizer.json",
)
def test_real_llada_tokenizer_golden_ids():
    tok = load_tokenizer(os.environ["DENGINE_LLADA_TOKENIZER"])
    prompt = (
        "Lily can run 12 kilometers per hour for 4 hours. After that, she runs 6 kilometers per hour. "
        "How many kilometers can she run in 8 hours?"
    )
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    assert tok.encode(text, add_special_tokens=False) == GOLDEN_LLADA_IDS
