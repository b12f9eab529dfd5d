"""How the denoiser gang splits a WanTransformer3DModel: the Wan family's ParallelPlan (services/families/base.py).

Every Wan variant the family serves runs through it: Wan2.1 T2V and I2V (CLIP image embeddings concatenated
before the text in cross-attention), Wan2.2 A14B T2V and I2V (two experts, each loaded through the plan) and
TI2V-5B (`expand_timesteps`: one timestep per token).

- `WanParallelTransformer`: diffusers' `WanTransformer3DModel.forward` with the token sequence split across the
  sequence-parallel ranks. Blocks run diffusers' own `WanTransformerBlock.forward`, with the self-attention
  processor swapped for the sequence-parallel one; cross-attention keeps diffusers' processor, since each rank's
  query tokens meet the whole text (and image) context held on every rank: no exchange.
- `shard_wan_blocks`: the TP layer plan (heads and FFN width split across the TP group).
"""

from __future__ import annotations

import functools
import math

import torch

from services.common.models import ModelDir
from services.denoiser.axes import AxisGroup
from services.denoiser.gang.distributed import Gang
from services.denoiser.gang.exchange import ulysses_exchange
from services.denoiser.gang.sequence import SequenceSplit
from services.denoiser.gang.tensor_parallel import (
    ShardPlan,
    load_sharded_transformer,
    shard_columns,
    shard_rms_norm,
    shard_rows,
)
from services.families.base import ParallelPlan
from services.families.wan_attention import install_self_attention

EXPERTS = ("transformer", "transformer_2")      # Wan2.2 A14B's second expert is loaded through the plan too


class WanParallelTransformer:
    """Callable like the diffusers model for what the denoiser passes it (latents, timesteps, text, image)."""

    def __init__(self, model: torch.nn.Module, gang: Gang, lse_kernel) -> None:
        self.model = model
        self.sequence = gang.axis("sequence")
        self.ulysses = gang.axis("ulysses")
        self.ring = gang.axis("ring")
        self.processors = install_self_attention(model, ulysses_exchange(gang), self.ring, lse_kernel)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_hidden_states_image: torch.Tensor | None = None,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        if self.sequence.size == 1:
            return self.model(hidden_states=hidden_states, timestep=timestep,
                              encoder_hidden_states=encoder_hidden_states,
                              encoder_hidden_states_image=encoder_hidden_states_image, return_dict=False)
        return (self._forward_split(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image),)

    def _forward_split(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       encoder_hidden_states_image: torch.Tensor | None) -> torch.Tensor:
        model = self.model
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)

        # 1. This rank's slice of the (padded) sequence; each ring block's count of real keys
        split = SequenceSplit.of(math.prod(grid), self.sequence, self.ulysses, self.ring)
        for processor in self.processors:
            processor.valid_keys = split.valid_keys
        freqs_cos, freqs_sin = model.rope(hidden_states)                       # [1, S, 1, d]
        rotary = (split.rotary(freqs_cos), split.rotary(freqs_sin))
        patches = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # [B, S, D]
        x = split.own(patches).contiguous()

        # 2. Conditions, as diffusers' forward computes them. Per-token timesteps (TI2V, [B, S]) are per-token
        # conditions like the rotary frequencies: each rank embeds only its own tokens' (padding gets t = 0, and is
        # dropped with the rest of the padding). That keeps the [B, S, 6, D] projection off every rank at full length;
        # its GEMMs over fewer rows round differently in the last bit (~1e-7 relative on CPU float32: rounding only).
        per_token = timestep.ndim == 2
        if per_token:
            timestep = split.own(timestep).flatten()
        temb, timestep_proj, context, image = model.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image,
            timestep_seq_len=split.per_rank if per_token else None)
        timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))
        if image is not None:
            context = torch.concat([image, context], dim=1)                   # Wan2.1 I2V: image tokens first

        # 3. Blocks, on this rank's tokens
        for transformer_block in model.blocks:
            x = transformer_block(x, context, timestep_proj, rotary)

        # 4. Output norm and projection, then every rank's tokens back in order, padding dropped
        table = model.scale_shift_table.to(temb.device)
        if per_token:
            shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = split.gather(model.proj_out(x), self.sequence)

        # 5. Unpatchify, as diffusers does
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def shard_wan_blocks(model: torch.nn.Module, tp: AxisGroup) -> ShardPlan:
    """Swap each block's layers for their sharded forms; returns how each sharded parameter is sliced.

    Image cross-attention (Wan2.1 I2V) shards like the text's: diffusers' WanAttnProcessor projects the image
    tokens with add_k_proj / add_v_proj, norms the keys with norm_added_k (an RMSNorm across all heads, as
    norm_k) and splits both into `attn.heads` heads, so they are column-parallel on the same heads as to_k / to_v,
    and the image and text attention outputs, summed before to_out, are the same heads' partial sums."""
    plan: ShardPlan = {}
    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}"
        for name in ("attn1", "attn2"):
            attn, path = getattr(block, name), f"{prefix}.{name}"
            image = attn.add_k_proj is not None
            for projection in ("to_q", "to_k", "to_v") + (("add_k_proj", "add_v_proj") if image else ()):
                shard_columns(attn, projection, f"{path}.{projection}", tp, plan)
            for norm in ("norm_q", "norm_k") + (("norm_added_k",) if image else ()):
                shard_rms_norm(attn, norm, f"{path}.{norm}", tp, plan)
            shard_rows(attn.to_out, "0", f"{path}.to_out.0", tp, plan)
            attn.heads //= tp.size
        shard_columns(block.ffn.net[0], "proj", f"{prefix}.ffn.net.0.proj", tp, plan)
        shard_rows(block.ffn.net, "2", f"{prefix}.ffn.net.2", tp, plan)
    return plan


load_wan_sharded = functools.partial(load_sharded_transformer, shard=shard_wan_blocks)


def wan_parallel_plan(model: ModelDir) -> ParallelPlan:
    """The plan for any Wan directory, from its transformers' configs. With two experts the layout must split
    both: the heads common to both (Wan2.2 A14B's two have the same), and each expert's FFN width."""
    configs = {name: model.config(name) for name in EXPERTS if model.has(name)}
    heads = math.gcd(*(int(config["num_attention_heads"]) for config in configs.values()))
    widths = {"ffn_dim": int(configs["transformer"]["ffn_dim"])}
    for name, config in configs.items():
        if int(config["ffn_dim"]) != widths["ffn_dim"]:
            widths[f"{name} ffn_dim"] = int(config["ffn_dim"])
    return ParallelPlan(heads=heads, tp_widths=widths, sequence_parallel=WanParallelTransformer,
                        tensor_parallel=load_wan_sharded)
