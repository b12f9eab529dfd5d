"""How the denoiser gang splits a FluxTransformer2DModel (FLUX.1 [dev] and [schnell]): the FLUX family's
ParallelPlan (services/families/base.py).

- `FluxParallelTransformer`: diffusers' `FluxTransformer2DModel.forward` with the image tokens split across the
  sequence-parallel ranks and the text tokens replicated on every rank (services/families/flux_attention.py says
  why and how the joint attention runs). Blocks run diffusers' own `FluxTransformerBlock.forward` and
  `FluxSingleTransformerBlock.forward`; what changes is the attention processor and what it is handed in place of
  the rotary tuple (a JointSplit: the text's and this rank's image rotary, the real keys per ring block).
- `shard_flux_blocks`: the TP layer plan, diffusers' `_tp_plan` for FLUX made concrete: heads and both MLPs split
  column/row-parallel, the single-stream proj_out split by blocks (its input is [attention, MLP]). FLUX's q/k
  RMSNorms are per head (over head_dim), so they stay whole on every rank, as do the modulations and norms.
"""

from __future__ import annotations

import functools

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
    shard_packed_rows,
    shard_rows,
)
from services.families.base import ParallelPlan
from services.families.flux_attention import JointSplit, install_joint_attention

MLP_RATIO = 4.0       # FluxSingleTransformerBlock's mlp_ratio and FeedForward's mult: not in the config


class FluxParallelTransformer:
    """Callable like the diffusers model for what the denoiser passes it (FluxRun.step_call's kwargs)."""

    def __init__(self, model: torch.nn.Module, gang: Gang, lse_kernel) -> None:
        self.model = model
        self.sequence = gang.axis("sequence")
        self.ulysses = gang.axis("ulysses")
        self.ring = gang.axis("ring")
        self.processors = install_joint_attention(model, ulysses_exchange(gang), self.ulysses, self.ring,
                                                  lse_kernel)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                 txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        if self.sequence.size == 1:
            return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                              pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                              txt_ids=txt_ids, guidance=guidance, return_dict=False)
        return (self._forward_split(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                                    txt_ids, guidance),)

    def _forward_split(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                       txt_ids: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        model = self.model
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids      # diffusers takes (and warns about) 3-d ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids

        # 1. This rank's slice of the (padded) image tokens; rotary for the tokens attention sees them on
        split = SequenceSplit.of(hidden_states.shape[1], self.sequence, self.ulysses, self.ring)
        freqs_cos, freqs_sin = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))    # [T + N, d], as diffusers
        text_tokens = txt_ids.shape[0]

        def per_token(f: torch.Tensor) -> torch.Tensor:           # [n, d] -> [1, n, 1, d], the kernel's layout
            return f.view(1, f.shape[0], 1, f.shape[1])

        joint = JointSplit(
            text_rotary=(per_token(freqs_cos[:text_tokens]), per_token(freqs_sin[:text_tokens])),
            image_rotary=(per_token(split.rotary(freqs_cos[text_tokens:], dim=0)),
                          per_token(split.rotary(freqs_sin[text_tokens:], dim=0))),
            valid_keys=split.valid_keys)
        x = model.x_embedder(split.own(hidden_states).contiguous())

        # 2. Conditions, as diffusers' forward computes them; the text on every rank
        timestep = timestep.to(x.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(x.dtype) * 1000
            temb = model.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, pooled_projections)
        context = model.context_embedder(encoder_hidden_states)

        # 3. Blocks: double-stream, then single-stream (which concatenates [text, this rank's image tokens])
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb, image_rotary_emb=joint)

        # 4. Output norm and projection, then every rank's image tokens back in order, padding dropped
        x = model.proj_out(model.norm_out(x, temb))
        return split.gather(x, self.sequence)


def shard_flux_blocks(model: torch.nn.Module, tp: AxisGroup) -> ShardPlan:
    """Swap each block's layers for their sharded forms; returns how each sharded parameter is sliced.

    Double-stream blocks: image and text q/k/v (to_*, add_*_proj) column-parallel on the same heads, their outputs
    (to_out.0, to_add_out) row-parallel; both MLPs (ff, ff_context) column then row. Single-stream blocks: q/k/v
    and proj_mlp column-parallel; proj_out reads [attention (dim), MLP (mlp width)], so each rank's rows are its
    share of each of the two (a Packed split), the same order its own concatenation has."""
    plan: ShardPlan = {}
    for index, block in enumerate(model.transformer_blocks):
        prefix = f"transformer_blocks.{index}"
        attn = block.attn
        for projection in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            shard_columns(attn, projection, f"{prefix}.attn.{projection}", tp, plan)
        shard_rows(attn.to_out, "0", f"{prefix}.attn.to_out.0", tp, plan)
        shard_rows(attn, "to_add_out", f"{prefix}.attn.to_add_out", tp, plan)
        _shard_heads(attn, tp)
        for name in ("ff", "ff_context"):
            feed_forward = getattr(block, name)
            shard_columns(feed_forward.net[0], "proj", f"{prefix}.{name}.net.0.proj", tp, plan)
            shard_rows(feed_forward.net, "2", f"{prefix}.{name}.net.2", tp, plan)
    for index, block in enumerate(model.single_transformer_blocks):
        prefix = f"single_transformer_blocks.{index}"
        attn = block.attn
        for projection in ("to_q", "to_k", "to_v"):
            shard_columns(attn, projection, f"{prefix}.attn.{projection}", tp, plan)
        _shard_heads(attn, tp)
        attention_width, mlp_width = block.proj_mlp.in_features, block.proj_mlp.out_features
        shard_columns(block, "proj_mlp", f"{prefix}.proj_mlp", tp, plan)
        shard_packed_rows(block, "proj_out", f"{prefix}.proj_out", tp, plan, (attention_width, mlp_width))
        block.mlp_hidden_dim //= tp.size
    return plan


def _shard_heads(attn, tp: AxisGroup) -> None:
    """The attention's own head counts, for this rank's heads (the processor counts heads by head_dim anyway)."""
    attn.heads //= tp.size
    attn.inner_dim //= tp.size


load_flux_sharded = functools.partial(load_sharded_transformer, shard=shard_flux_blocks)


def flux_parallel_plan(model: ModelDir) -> ParallelPlan:
    """The plan for a FLUX.1 directory, from its transformer's config. Heads split over ulysses x tp; TP also
    splits both MLPs' hidden width (4 x the model width), which divides wherever the heads do."""
    config = model.config("transformer")
    heads = int(config.get("num_attention_heads", 24))
    width = heads * int(config.get("attention_head_dim", 128))
    return ParallelPlan(heads=heads, tp_widths={"mlp_hidden_dim": int(width * MLP_RATIO)},
                        sequence_parallel=FluxParallelTransformer, tensor_parallel=load_flux_sharded,
)
