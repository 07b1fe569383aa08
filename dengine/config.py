"""Model configuration read from a checkpoint folder's config.json and generation_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file, or a file does not match the others."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and special-token ids of one checkpoint, in family-neutral names."""

    model_type: str  # "llada" or "dream"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding and of the LM head
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    # LLaDA applies RoPE in fp32 and casts back; Dream casts cos/sin to the activation dtype.
    rope_in_fp32: bool
    # The distribution for canvas position i is read at model output i - logit_shift (Dream: 1).
    logit_shift: int
    max_position_embeddings: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config.json: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"config.json: head_dim {self.head_dim} must be even for RoPE")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(self, name)
            if not 0 <= token_id < self.vocab_size:
                raise CheckpointError(
                    f"config.json: {name} {token_id} is outside the vocabulary (size {self.vocab_size})"
                )

    @property
    def kv_dim(self) -> int:
        """Width of one token's key (or value) across all key/value heads."""
        return self.num_kv_heads * self.head_dim


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """Read one JSON file of a checkpoint folder, naming the file in any error."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def require(raw: dict[str, Any], key: str, source: str = "config.json") -> Any:
    """Return raw[key] or raise a CheckpointError naming the missing field."""
    if raw.get(key) is None:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return raw[key]


def expect(raw: dict[str, Any], key: str, wanted: Any, source: str = "config.json") -> None:
    """Reject architecture variants dengine does not implement, naming the field."""
    value = raw.get(key, wanted)
    if value != wanted:
        raise CheckpointError(f"{source}: {key}={value!r} is not supported (dengine implements {wanted!r})")


def first_token_id(value: Any) -> int | None:
    """Generation configs may list several EOS ids; the first is the canonical one."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def special_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, int]:
    """EOS and PAD ids from config.json, falling back to generation_config.json; PAD defaults to EOS."""
    eos = first_token_id(raw.get("eos_token_id", generation.get("eos_token_id")))
    if eos is None:
        raise CheckpointError("config.json: eos_token_id is missing (and generation_config.json has none)")
    pad = first_token_id(raw.get("pad_token_id", generation.get("pad_token_id")))
    return eos, eos if pad is None else pad
