"""Dream (model_type "Dream"): Qwen2.5 blocks made bidirectional, GQA, q/k/v biases, shifted logits."""

from __future__ import annotations

from typing import Any

from dengine.config import ModelConfig, expect, first_token_id, require, special_ids
from dengine.models.transformer import CheckpointNames, DiffusionLM

_FIXED_FIELDS = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "rope_scaling": None,
    "use_mrope": False,
}


class DreamModel(DiffusionLM):
    """Dream-v0-Base/Instruct-7B and checkpoints of the same layout."""

    model_type = "dream"
    checkpoint_names = CheckpointNames(
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="lm_head.weight",
        layer_prefix="model.layers.{i}.",
        attn_norm="input_layernorm",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        o_proj="self_attn.o_proj",
        mlp_norm="post_attention_layernorm",
        gate_proj="mlp.gate_proj",
        up_proj="mlp.up_proj",
        down_proj="mlp.down_proj",
    )

    @classmethod
    def parse_config(cls, raw: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
        for key, wanted in _FIXED_FIELDS.items():
            expect(raw, key, wanted)
        hidden = int(require(raw, "hidden_size"))
        heads = int(require(raw, "num_attention_heads"))
        eos, pad = special_ids(raw, generation)
        return ModelConfig(
            model_type=cls.model_type,
            hidden_size=hidden,
            num_layers=int(require(raw, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(require(raw, "intermediate_size")),
            vocab_size=int(require(raw, "vocab_size")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            qkv_bias=True,
            rope_in_fp32=False,
            logit_shift=1,
            max_position_embeddings=int(require(raw, "max_position_embeddings")),
            mask_token_id=int(require(raw, "mask_token_id")),
            eos_token_id=eos,
            pad_token_id=pad,
            bos_token_id=first_token_id(raw.get("bos_token_id", generation.get("bos_token_id"))),
        )
