"""LLaDA (model_type "llada"): Llama-style blocks, bidirectional, fp32 RoPE, logits unshifted."""

from __future__ import annotations

from typing import Any

from dengine.config import ModelConfig, expect, first_token_id, require, special_ids
from dengine.models.transformer import CheckpointNames, DiffusionLM

# Architecture switches of LLaDA's config and the only values dengine implements.
_FIXED_FIELDS = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "attention_layer_norm": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "bias_for_layer_norm": False,
    "weight_tying": False,
    "scale_logits": False,
    "input_emb_norm": False,
}


class LLaDAModel(DiffusionLM):
    """LLaDA-8B-Base/Instruct and checkpoints of the same layout."""

    model_type = "llada"
    checkpoint_names = CheckpointNames(
        embed="model.transformer.wte.weight",
        final_norm="model.transformer.ln_f.weight",
        lm_head="model.transformer.ff_out.weight",
        layer_prefix="model.transformer.blocks.{i}.",
        attn_norm="attn_norm",
        q_proj="q_proj",
        k_proj="k_proj",
        v_proj="v_proj",
        o_proj="attn_out",
        mlp_norm="ff_norm",
        gate_proj="ff_proj",
        up_proj="up_proj",
        down_proj="ff_out",
    )

    @classmethod
    def parse_config(cls, raw: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
        for key, wanted in _FIXED_FIELDS.items():
            expect(raw, key, wanted)
        hidden = int(require(raw, "d_model"))
        heads = int(require(raw, "n_heads"))
        kv_heads = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else heads)
        mlp_hidden = raw.get("mlp_hidden_size") or int(require(raw, "mlp_ratio")) * hidden
        eos, pad = special_ids(raw, generation)
        return ModelConfig(
            model_type=cls.model_type,
            hidden_size=hidden,
            num_layers=int(require(raw, "n_layers")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=hidden // heads,
            intermediate_size=int(mlp_hidden),
            vocab_size=int(raw.get("embedding_size") or require(raw, "vocab_size")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            qkv_bias=False,
            rope_in_fp32=bool(raw.get("rope_full_precision", True)),
            logit_shift=0,
            max_position_embeddings=int(require(raw, "max_sequence_length")),
            mask_token_id=int(require(raw, "mask_token_id")),
            eos_token_id=eos,
            pad_token_id=pad,
            bos_token_id=first_token_id(generation.get("bos_token_id", raw.get("bos_token_id"))),
        )
