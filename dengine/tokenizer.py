"""Tokenizers of checkpoint folders, through transformers and without any model-specific code.

LLaDA ships tokenizer.json; Dream ships Qwen2's vocab.json + merges.txt plus added tokens listed in
tokenizer_config.json (its own tokenizer class needs trust_remote_code, which dengine never uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Tokenizer

from dengine.config import CheckpointError, ModelConfig, read_json

_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _added_tokens(path: Path, config: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    """Added tokens in id order, from tokenizer_config.json's added_tokens_decoder or added_tokens.json."""
    decoder = config.get("added_tokens_decoder")
    if decoder:
        return sorted(
            (
                int(token_id),
                AddedToken(
                    spec["content"],
                    special=spec.get("special", True),
                    normalized=spec.get("normalized", False),
                    lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False),
                    single_word=spec.get("single_word", False),
                ),
            )
            for token_id, spec in decoder.items()
        )
    listed = read_json(path / "added_tokens.json", required=False)
    return sorted((int(token_id), AddedToken(content, special=True)) for content, token_id in listed.items())


def _bpe_tokenizer(path: Path, config: dict[str, Any]) -> PreTrainedTokenizerBase:
    for name in ("vocab.json", "merges.txt"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: file not found (a vocab.json + merges.txt tokenizer needs both)")
    tokenizer = Qwen2Tokenizer(
        vocab=str(path / "vocab.json"),
        merges=str(path / "merges.txt"),
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
    )
    for token_id, token in _added_tokens(path, config):
        tokenizer.add_tokens([token])
        placed = tokenizer.convert_tokens_to_ids(token.content)
        if placed != token_id:
            raise CheckpointError(
                f"{path}: added token {token.content!r} must have id {token_id} but the vocabulary puts it at "
                f"{placed}; tokenizer_config.json and vocab.json do not match"
            )
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer with its special tokens and chat template, or None if it has none."""
    path = Path(path)
    config = read_json(path / "tokenizer_config.json", required=False)
    if (path / "tokenizer.json").is_file():
        try:
            tokenizer: PreTrainedTokenizerBase = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own exception types for malformed files
            raise CheckpointError(f"{path / 'tokenizer.json'}: not a valid tokenizer ({exc})") from exc
    elif (path / "vocab.json").is_file() or (path / "merges.txt").is_file():
        tokenizer = _bpe_tokenizer(path, config)
    else:
        return None
    special_map = read_json(path / "special_tokens_map.json", required=False)
    for role in _SPECIAL_ROLES:
        content = _token_content(config.get(role) or special_map.get(role))
        if content is None:
            continue
        if tokenizer.convert_tokens_to_ids(content) in (None, tokenizer.unk_token_id) and content != tokenizer.unk_token:
            raise CheckpointError(f"{path}: {role} {content!r} is not in the tokenizer's vocabulary")
        setattr(tokenizer, role, content)
    template_file = path / "chat_template.jinja"
    template = config.get("chat_template") or (template_file.read_text(encoding="utf-8") if template_file.is_file() else None)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def check_tokenizer_matches(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Raise if the tokenizer's ids disagree with the model's config (vocab size, EOS, mask)."""
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {len(tokenizer)} ids but the model's vocabulary has {config.vocab_size} rows"
        )
    checks = (("eos_token", tokenizer.eos_token_id, config.eos_token_id), ("mask_token", tokenizer.mask_token_id, config.mask_token_id))
    for role, tokenizer_id, config_id in checks:
        if tokenizer_id is not None and tokenizer_id != config_id:
            raise CheckpointError(
                f"{path}: the tokenizer's {role} has id {tokenizer_id} but config.json says {config_id}"
            )


END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The chat end-of-turn token (LLaDA's <|eot_id|>, Dream's <|im_end|>), if the tokenizer has one."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return vocab[token]
    return None
