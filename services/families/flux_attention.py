"""FLUX's joint attention as diffmesh runs it, on one device and in every gang layout: diffusers' FluxAttnProcessor
(text and image tokens attending together) and, given a gang's axes, the image tokens split over Ulysses and Ring
ranks. One device and the gang run the same kernels, so their numbers agree and their speeds compare like with like.

How the sequence splits. Image tokens are split across the sequence ranks (padded at the end of the sequence, as
the Wan forward pads); the text tokens are replicated on every rank, as xDiT's FLUX runs them. diffusers'
`_cp_plan` for FluxTransformer2DModel splits the text too, which needs both lengths to divide and would put a
second run of padding in the middle of each rank's joint sequence, where trimming keys cannot drop it; the text is
short (at most 512 tokens) beside the image (4096 at 1024 px), so replicating it costs little:
- Ulysses: only the image q/k/v travel (for the ring block's tokens on h/U heads); each rank takes its h/U heads of
  its own text q/k/v, and the text output's heads are all-gathered back, since every rank carries the whole text.
- Ring: only image K/V travel round the ring; the text K/V, which every ring rank holds, are attended once, with
  the rank's own block at the first step; text queries attend every block like the image queries.
The joint key order inside a step does not matter to attention; padding keys sit at the end of each ring block and
are trimmed, never masked.

No torch.distributed gang machinery is imported here (the one-device denoiser loads this module): the Ulysses
exchange and the axes are handed in.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from services.common.attention import attention
from services.denoiser.axes import ALONE, AxisGroup
from services.denoiser.ring import ring_attention
from services.denoiser.rotary import apply_rotary

Rotary = tuple[torch.Tensor, torch.Tensor]      # (cos, sin), each [1, n, 1, head_dim]


@dataclasses.dataclass(frozen=True)
class JointSplit:
    """What the gang's FLUX forward hands each attention layer where diffusers' forward hands the rotary tuple:
    the text's rotary, the image tokens' rotary (for the tokens attention sees them on: the ring block's under
    Ulysses, this rank's own otherwise) and each ring block's count of real image keys."""

    text_rotary: Rotary
    image_rotary: Rotary
    valid_keys: list[int]

    @property
    def text_tokens(self) -> int:
        return self.text_rotary[0].shape[1]


class FluxJointAttention:
    """Replaces FluxAttnProcessor in every FLUX block (double-stream: image `hidden_states` and text
    `encoder_hidden_states`; single-stream: the two concatenated, text first). Given diffusers' rotary tuple it is
    diffusers' processor with the rotary embedding on the shared kernel (services/denoiser/rotary.py, bit-identical
    to diffusers'); given a JointSplit it runs the split described above.

    `ulysses` is the Ulysses axis' exchange (CollectiveExchange or CopyEngineExchange), None without one;
    `ulysses_axis` its group (the text output's heads are gathered over it)."""

    def __init__(self, ulysses=None, ulysses_axis: AxisGroup = ALONE, ring: AxisGroup = ALONE,
                 lse_kernel=None) -> None:
        self.ulysses = ulysses
        self.ulysses_axis = ulysses_axis
        self.ring = ring
        self.lse_kernel = lse_kernel

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if isinstance(image_rotary_emb, JointSplit):
            if attention_mask is not None:
                raise ValueError("the gang's FLUX attention takes no attention mask")
            return self._split(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return self._whole(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    # The whole joint sequence on this rank (one device, or a gang that splits no tokens) ----------------------

    def _whole(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary):
        query, key, value = _project(attn, hidden_states, text=False)
        if encoder_hidden_states is not None:
            text_query, text_key, text_value = _project(attn, encoder_hidden_states, text=True)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if rotary is not None:
            cos, sin = (f.view(1, f.shape[0], 1, f.shape[1]) for f in rotary)     # [S, d] -> [1, S, 1, d]
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))                  # [B, h, n, d] views
        out = attention(q, k, v, attn_mask=attention_mask).transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                              out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())

    # Image tokens split across the sequence ranks, text replicated -------------------------------------------

    def _split(self, attn, hidden_states, encoder_hidden_states, split: JointSplit):
        text_tokens = split.text_tokens
        joint = encoder_hidden_states is None                  # single-stream block: [text, image] in one tensor
        if joint:       # one projection for both (the same weights), then text and image apart
            query, key, value = _project(attn, hidden_states, text=False)
            text_q, text_k, text_v = (x[:, :text_tokens] for x in (query, key, value))
            image_q, image_k, image_v = (x[:, text_tokens:] for x in (query, key, value))
        else:
            image_q, image_k, image_v = _project(attn, hidden_states, text=False)
            text_q, text_k, text_v = _project(attn, encoder_hidden_states, text=True)
        dtype = image_q.dtype

        image_q, image_k, image_v = self._image_for_attention(image_q, image_k, image_v, split.image_rotary)
        heads = image_q.shape[2]
        if self.ulysses is not None:          # this rank's heads of the replicated text: the exchange's head order
            first = self.ulysses_axis.index * heads
            text_q, text_k, text_v = (x[:, :, first:first + heads] for x in (text_q, text_k, text_v))
        text_q, text_k = (apply_rotary(x, *split.text_rotary) for x in (text_q, text_k))

        q = torch.cat([text_q, image_q], dim=1).transpose(1, 2)                      # [B, h', T + n, d]
        if self.ring.size > 1:
            local = (text_k.transpose(1, 2), text_v.transpose(1, 2))
            out = ring_attention(q, image_k.transpose(1, 2), image_v.transpose(1, 2), self.ring, split.valid_keys,
                                 self.lse_kernel, local_kv=local)
        else:
            keys = text_tokens + split.valid_keys[0]
            k = torch.cat([text_k, image_k], dim=1).transpose(1, 2)[:, :, :keys]
            v = torch.cat([text_v, image_v], dim=1).transpose(1, 2)[:, :, :keys]
            out = attention(q, k, v)
        out = out.transpose(1, 2)                                                    # [B, T + n, h', d]
        text_out, image_out = out[:, :text_tokens], out[:, text_tokens:]
        if self.ulysses is not None:
            self.ulysses.inputs_read()
            image_out = self.ulysses.heads_to_tokens(image_out)                      # [B, s, h, d]
            text_out = _gather_heads(text_out, self.ulysses_axis)                    # [B, T, h, d]
        text_out, image_out = text_out.flatten(2, 3).to(dtype), image_out.flatten(2, 3).to(dtype)
        if joint:
            out = torch.cat([text_out, image_out], dim=1)      # a copy: the exchange's buffer is free after it
            self._output_read()
            return out
        image_out = attn.to_out[0](image_out.contiguous())
        self._output_read()
        return attn.to_out[1](image_out), attn.to_add_out(text_out.contiguous())

    def _image_for_attention(self, query, key, value, rotary: Rotary):
        """This rank's image q, k, v [B, s, h, d] -> what attention reads: under Ulysses, exchanged for the ring
        block's tokens on h/U heads (each exchange in flight while the next is sent; rotary after it, on the
        block's frequencies, as the Wan processor does); otherwise the rank's own tokens. Rotary applied."""
        if self.ulysses is None:
            return apply_rotary(query, *rotary), apply_rotary(key, *rotary), value
        exchange = self.ulysses
        heads = query.shape[2]
        exchange.start()
        value = exchange.send(value.flatten(2, 3), "v", heads)
        query = exchange.send(query.flatten(2, 3), "q", heads)
        key = exchange.send(key.flatten(2, 3), "k", heads)
        query = apply_rotary(query.wait(), *rotary)                                 # while k travels
        key = apply_rotary(key.wait(), *rotary)
        return query, key, value.wait()

    def _output_read(self) -> None:
        if self.ulysses is not None:
            self.ulysses.output_read()


def _project(attn, x: torch.Tensor, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, n, h, d] with FLUX's per-head RMSNorms, by the image projections or the text's (add_*). Heads
    are counted by head_dim, so a TP rank's column slice gives its own heads."""
    if text:
        projections, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q,
                                                                                   attn.norm_added_k)
    else:
        projections, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
    query, key, value = (projection(x).unflatten(-1, (-1, attn.head_dim)) for projection in projections)
    return norms[0](query), norms[1](key), value


def _gather_heads(x: torch.Tensor, ulysses: AxisGroup) -> torch.Tensor:
    """[B, T, h/U, d] on every Ulysses rank (its heads, in rank order) -> [B, T, h, d] on all."""
    pieces = [torch.empty_like(x) for _ in range(ulysses.size)]
    dist.all_gather(pieces, x.contiguous(), group=ulysses.group)
    return torch.cat(pieces, dim=2)


def install_joint_attention(model: torch.nn.Module, ulysses=None, ulysses_axis: AxisGroup = ALONE,
                            ring: AxisGroup = ALONE, lse_kernel=None) -> list[FluxJointAttention]:
    """Give every FLUX block's attention (double- and single-stream) one FluxJointAttention; returns them. With no
    arguments: what one device installs (`FluxFamily.install_kernels`), diffusers' numbers on the shared kernels."""
    processors = []
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        processor = FluxJointAttention(ulysses, ulysses_axis, ring, lse_kernel)
        block.attn.set_processor(processor)
        processors.append(processor)
    return processors
