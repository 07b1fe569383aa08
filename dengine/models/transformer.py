"""The bidirectional transformer both families share, and how its parameters map to checkpoint tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dengine.config import ModelConfig
from dengine.forward_context import ForwardContext
from dengine.kv.kv_cache import PagedKVCache
from dengine.models.layers import DecoderLayer, RMSNorm, rope_cos_sin

# One parameter of the model is filled from one or more checkpoint tensors stacked along dim 0
# (dengine fuses q/k/v and gate/up): each part is (checkpoint tensor name, its number of rows).
CheckpointLayout = dict[str, list[tuple[str, int]]]


@dataclass(frozen=True)
class CheckpointNames:
    """A family's tensor names; per-layer names are relative to layer_prefix."""

    embed: str
    final_norm: str
    lm_head: str
    layer_prefix: str  # formatted with i, the layer index
    attn_norm: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp_norm: str
    gate_proj: str
    up_proj: str
    down_proj: str


class DiffusionLM(nn.Module):
    """A masked-diffusion LM whose forward computes only the positions a step's ForwardBatch lists."""

    model_type: ClassVar[str]
    checkpoint_names: ClassVar[CheckpointNames]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def parse_config(cls, raw: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
        """Translate the family's config.json (and generation_config.json) into a ModelConfig."""
        raise NotImplementedError

    def forward(self, ctx: ForwardContext, kv_cache: PagedKVCache) -> torch.Tensor:
        """Run every layer on the batch's query rows; return logits [len(batch.logits_indices), vocab]."""
        c, batch = self.config, ctx.batch
        x = self.embed(batch.input_ids)
        rope = rope_cos_sin(batch.positions, c.head_dim, c.rope_theta, torch.float32 if c.rope_in_fp32 else x.dtype)
        for layer in self.layers:
            x = layer(x, rope, ctx, kv_cache)
        # Norm and LM head only for the rows whose logits the caller reads.
        x = x.index_select(0, batch.logits_indices)
        return self.lm_head(self.final_norm(x))

    def checkpoint_layout(self) -> CheckpointLayout:
        """Every parameter's source tensors in the family's checkpoint."""
        c, n = self.config, self.checkpoint_names
        q_rows, kv_rows = c.num_heads * c.head_dim, c.kv_dim
        layout: CheckpointLayout = {
            "embed.weight": [(n.embed, c.vocab_size)],
            "final_norm.weight": [(n.final_norm, c.hidden_size)],
            "lm_head.weight": [(n.lm_head, c.vocab_size)],
        }
        for i in range(c.num_layers):
            src, dst = n.layer_prefix.format(i=i), f"layers.{i}."
            layout[dst + "attn_norm.weight"] = [(src + n.attn_norm + ".weight", c.hidden_size)]
            for kind in ("weight", "bias") if c.qkv_bias else ("weight",):
                layout[dst + f"attn.qkv_proj.{kind}"] = [
                    (src + n.q_proj + f".{kind}", q_rows),
                    (src + n.k_proj + f".{kind}", kv_rows),
                    (src + n.v_proj + f".{kind}", kv_rows),
                ]
            layout[dst + "attn.o_proj.weight"] = [(src + n.o_proj + ".weight", c.hidden_size)]
            layout[dst + "mlp_norm.weight"] = [(src + n.mlp_norm + ".weight", c.hidden_size)]
            layout[dst + "mlp.gate_up_proj.weight"] = [
                (src + n.gate_proj + ".weight", c.intermediate_size),
                (src + n.up_proj + ".weight", c.intermediate_size),
            ]
            layout[dst + "mlp.down_proj.weight"] = [(src + n.down_proj + ".weight", c.hidden_size)]
        return layout

    def query_positions_for(self, scored_positions: torch.Tensor) -> torch.Tensor:
        """Positions to compute so that scored_positions get logits (Dream reads i at i - 1)."""
        return (scored_positions - self.config.logit_shift).clamp_min(0)
