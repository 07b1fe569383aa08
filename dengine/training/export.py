"""Write a model as a checkpoint folder in exactly the real LLaDA / Dream formats."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dengine.config import ModelConfig
from dengine.models.transformer import DiffusionLM


def config_json(config: ModelConfig) -> tuple[dict, dict]:
    """config.json and generation_config.json with the real models' fields, at this model's sizes."""
    if config.model_type == "llada":
        raw = {
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
            "d_model": config.hidden_size, "embedding_dropout": 0.0, "embedding_size": config.vocab_size,
            "eos_token_id": config.eos_token_id, "flash_attention": False, "include_bias": False,
            "include_qkv_bias": False, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
            "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
            "mask_token_id": config.mask_token_id, "max_sequence_length": config.max_position_embeddings,
            "mlp_hidden_size": config.intermediate_size, "mlp_ratio": 4, "model_type": "llada",
            "multi_query_attention": None, "n_heads": config.num_heads, "n_kv_heads": config.num_kv_heads,
            "n_layers": config.num_layers, "pad_token_id": config.pad_token_id, "precision": "amp_bf16",
            "residual_dropout": 0.0, "rms_norm_eps": config.rms_norm_eps, "rope": True,
            "rope_full_precision": True, "rope_theta": config.rope_theta, "scale_logits": False,
            "use_cache": False, "vocab_size": config.vocab_size, "weight_tying": False,
        }
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    else:
        raw = {
            "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id, "hidden_act": "silu", "hidden_size": config.hidden_size,
            "initializer_range": 0.02, "intermediate_size": config.intermediate_size,
            "mask_token_id": config.mask_token_id, "max_position_embeddings": config.max_position_embeddings,
            "max_window_layers": config.num_layers, "model_type": "Dream",
            "num_attention_heads": config.num_heads, "num_hidden_layers": config.num_layers,
            "num_key_value_heads": config.num_kv_heads, "pad_token_id": config.pad_token_id,
            "rms_norm_eps": config.rms_norm_eps, "rope_scaling": None, "rope_theta": config.rope_theta,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "use_mrope": False, "use_sliding_window": False, "vocab_size": config.vocab_size,
        }
        generation = {"alg": "maskgit_plus", "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      "eps": 0.001, "mask_token_id": config.mask_token_id, "pad_token_id": config.pad_token_id,
                      "steps": 128, "temperature": 0.0}
    return raw, generation


def save_checkpoint(model: DiffusionLM, folder: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json, generation_config.json and model.safetensors under the family's real tensor names."""
    folder.mkdir(parents=True, exist_ok=True)
    raw, generation = config_json(model.config)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    params = dict(model.named_parameters())
    tensors = {}
    for param_name, parts in model.checkpoint_layout().items():
        row = 0
        for tensor_name, rows in parts:
            tensors[tensor_name] = params[param_name].detach()[row : row + rows].to(dtype).contiguous()
            row += rows
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
