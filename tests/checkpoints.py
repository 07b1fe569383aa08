"""Tiny LLaDA- and Dream-format checkpoints written in the real folder layout, and their HF oracles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

DATA = Path(__file__).parent / "data"
REAL = {"llada": DATA / "hf" / "llada-8b-instruct", "dream": DATA / "hf" / "dream-v0-instruct-7b"}

VOCAB = 320
MASK_ID, EOS_ID, BOS_ID = 310, 311, 312


def tiny_config(family: str, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int | None = None,
                intermediate: int = 96) -> dict:
    """The real config.json with small sizes and in-range special ids."""
    raw = json.loads((REAL[family] / "config.json").read_text())
    if family == "llada":
        raw.update(d_model=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads or heads,
                   mlp_hidden_size=intermediate, vocab_size=VOCAB, embedding_size=VOCAB,
                   mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, max_sequence_length=512,
                   rope_theta=10000.0)
    else:
        raw.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=kv_heads or max(1, heads // 2), intermediate_size=intermediate,
                   vocab_size=VOCAB, mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                   bos_token_id=EOS_ID, max_position_embeddings=512, rope_theta=10000.0)
    return raw


def real_state_dict(family: str, raw: dict, generator: torch.Generator, head_scale: float = 1.0,
                    attn_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights under the family's real tensor names (written out independently of dengine)."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * (0.5 / shape[-1] ** 0.5 if len(shape) > 1 else 0.1)

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(dim, generator=generator)

    sd: dict[str, torch.Tensor] = {}
    if family == "llada":
        d, h, n, heads = raw["d_model"], raw["mlp_hidden_size"], raw["n_layers"], raw["n_heads"]
        kv = raw["n_kv_heads"] * (d // heads)
        sd["model.transformer.wte.weight"] = torch.randn(VOCAB, d, generator=generator)
        sd["model.transformer.ln_f.weight"] = norm(d)
        sd["model.transformer.ff_out.weight"] = rand(VOCAB, d) * head_scale
        for i in range(n):
            p = f"model.transformer.blocks.{i}."
            sd[p + "attn_norm.weight"] = norm(d)
            sd[p + "q_proj.weight"] = rand(d, d) * attn_scale
            sd[p + "k_proj.weight"] = rand(kv, d) * attn_scale
            sd[p + "v_proj.weight"] = rand(kv, d)
            sd[p + "attn_out.weight"] = rand(d, d)
            sd[p + "ff_norm.weight"] = norm(d)
            sd[p + "ff_proj.weight"] = rand(h, d)
            sd[p + "up_proj.weight"] = rand(h, d)
            sd[p + "ff_out.weight"] = rand(d, h)
    else:
        d, h, n, heads = raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"], raw["num_attention_heads"]
        kv = raw["num_key_value_heads"] * (d // heads)
        sd["model.embed_tokens.weight"] = torch.randn(VOCAB, d, generator=generator)
        sd["model.norm.weight"] = norm(d)
        sd["lm_head.weight"] = rand(VOCAB, d) * head_scale
        for i in range(n):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = norm(d)
            sd[p + "post_attention_layernorm.weight"] = norm(d)
            for name, rows, scale in (("q_proj", d, attn_scale), ("k_proj", kv, attn_scale), ("v_proj", kv, 1.0)):
                sd[p + f"self_attn.{name}.weight"] = rand(rows, d) * scale
                sd[p + f"self_attn.{name}.bias"] = rand(rows)
            sd[p + "self_attn.o_proj.weight"] = rand(d, d)
            sd[p + "mlp.gate_proj.weight"] = rand(h, d)
            sd[p + "mlp.up_proj.weight"] = rand(h, d)
            sd[p + "mlp.down_proj.weight"] = rand(d, h)
    return sd


def write_checkpoint(folder: Path, family: str, seed: int, shards: int = 2, dtype: torch.dtype = torch.float32,
                     head_scale: float = 1.0, attn_scale: float = 1.0, **sizes) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write config, generation config and weights (sharded via an index when shards > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(family, **sizes)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    shutil.copy(REAL[family] / "generation_config.json", folder / "generation_config.json")
    if family == "llada":
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    sd = real_state_dict(family, raw, torch.Generator().manual_seed(seed), head_scale, attn_scale)
    names = list(sd)
    if shards == 1:
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, folder / "model.safetensors")
        return folder, sd
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    weight_map = {}
    for s in range(shards):
        shard_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = [names[j] for j in order[s::shards]]
        save_file({k: sd[k].to(dtype).contiguous() for k in part}, folder / shard_name)
        weight_map.update({k: shard_name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder, sd


def hf_oracle(family: str, raw: dict, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (LLaDA) or Qwen2ForCausalLM (Dream) holding the same weights."""
    if family == "llada":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=raw["d_model"], intermediate_size=raw["mlp_hidden_size"], num_hidden_layers=raw["n_layers"],
            num_attention_heads=raw["n_heads"], num_key_value_heads=raw["n_kv_heads"], vocab_size=VOCAB,
            rms_norm_eps=raw["rms_norm_eps"], rope_theta=raw["rope_theta"], attention_bias=False, mlp_bias=False,
            tie_word_embeddings=False, max_position_embeddings=raw["max_sequence_length"],
        )
        model = LlamaForCausalLM(config)
        renames = [("model.transformer.wte.", "model.embed_tokens."), ("model.transformer.ln_f.", "model.norm."),
                   ("model.transformer.ff_out.", "lm_head."), ("model.transformer.blocks.", "model.layers."),
                   (".attn_norm.", ".input_layernorm."), (".q_proj.", ".self_attn.q_proj."),
                   (".k_proj.", ".self_attn.k_proj."), (".v_proj.", ".self_attn.v_proj."),
                   (".attn_out.", ".self_attn.o_proj."), (".ff_norm.", ".post_attention_layernorm."),
                   (".ff_proj.", ".mlp.gate_proj."), (".up_proj.", ".mlp.up_proj."), (".ff_out.", ".mlp.down_proj.")]
        renamed = {}
        for name, tensor in sd.items():
            for old, new in renames:
                name = name.replace(old, new)
            renamed[name] = tensor
        sd = renamed
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"], vocab_size=VOCAB, rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=raw["rope_theta"], tie_word_embeddings=False, use_sliding_window=False,
            max_position_embeddings=raw["max_position_embeddings"],
        )
        model = Qwen2ForCausalLM(config)
    config._attn_implementation = "sdpa"
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.eval()


def hf_bidirectional_logits(oracle: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of the oracle with an all-true 4-D mask, i.e. bidirectional attention."""
    t = tokens.numel()
    mask = torch.ones(1, 1, t, t, dtype=torch.bool)
    with torch.no_grad():
        return oracle(input_ids=tokens[None], attention_mask=mask).logits[0]


LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|mdm_mask|>"]


def write_llada_tokenizer(folder: Path, corpus: list[str], vocab_size: int) -> dict[str, int]:
    """A byte-level BPE tokenizer.json with LLaDA's special tokens and LLaDA's real tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLADA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((REAL["llada"] / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "additional_special_tokens", "cls_token"):
        config.pop(key)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return {token: tokenizer.token_to_id(token) for token in LLADA_SPECIALS}
