"""A character-level tokenizer.json with the special tokens the real LLaDA / Dream models use, in the same roles."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

# Printable ASCII and newline: every character of the task, the chat templates and role names.
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

LLADA_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "mask_token": "<|mdm_mask|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "end_of_turn": "<|eot_id|>",
}
DREAM_SPECIALS = {
    "eos_token": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "end_of_turn": "<|im_end|>",
    "bos_token": "<|beginoftext|>",
    "mask_token": "<|mask|>",
}
# LLaDA-8B-Instruct's chat template, verbatim in behaviour (see checkpoints.md).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)
# Qwen2.5 ChatML with the default system prompt, as Dream-v0-Instruct's template renders tool-free chats.
DREAM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- set rest = messages[1:] %}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- set rest = messages %}"
    "{%- endif %}{%- for message in rest %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def specials_for(family: str) -> dict[str, str]:
    return LLADA_SPECIALS if family == "llada" else DREAM_SPECIALS


def write_tokenizer(folder: Path, family: str) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; return the special tokens' ids by role."""
    specials = specials_for(family)
    tokens = list(specials.values()) + CHARACTERS
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    for token, index in vocab.items():
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"tokenizer placed {token!r} at {tokenizer.token_to_id(token)}, expected {index}")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "bos_token": specials["bos_token"],
        "eos_token": specials["eos_token"],
        "pad_token": specials["eos_token"],
        "mask_token": specials["mask_token"],
        "chat_template": LLADA_CHAT_TEMPLATE if family == "llada" else DREAM_CHAT_TEMPLATE,
        "model_max_length": 1024,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {role: vocab[token] for role, token in specials.items()}
