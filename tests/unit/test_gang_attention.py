"""Ulysses' exchange on a real 2-rank gloo gang: the sequence-parallel processor on a diffusers WanAttention,
each rank holding half the tokens, against diffusers' own processor on the whole sequence (one and two
samples: the exchange copies differently when there is more than one)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.denoiser.axes import AxisGroup
from services.denoiser.gang.attention import CollectiveExchange, _lse_flash_cpu
from services.denoiser.gang.launcher import free_port
from services.families.wan_attention import SequenceParallelAttention

HEADS, HEAD_DIM, TOKENS = 10, 8, 14     # 2 ranks: 7 tokens and, after the exchange, 5 heads each


def _attention_module():
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    torch.manual_seed(3)
    attention = WanAttention(dim=HEADS * HEAD_DIM, heads=HEADS, dim_head=HEAD_DIM, processor=WanAttnProcessor())
    return attention.eval()


def _inputs(batch: int):
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, TOKENS, HEADS * HEAD_DIM, generator=generator)
    angles = torch.randn(1, TOKENS, 1, HEAD_DIM, generator=generator)
    return hidden, (angles.cos(), angles.sin())


BATCHES = (1, 2)


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        attention = _attention_module()
        ulysses = AxisGroup(group=dist.new_group([0, 1]), ranks=[0, 1], index=rank)
        processor = SequenceParallelAttention(CollectiveExchange(ulysses), AxisGroup(None, [rank], 0), _lse_flash_cpu)
        processor.valid_keys = [TOKENS]
        attention.set_processor(processor)
        local = slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2)
        for batch in BATCHES:
            hidden, rotary = _inputs(batch)
            with torch.inference_mode():
                out = attention(hidden[:, local], rotary_emb=rotary)
            torch.save(out, os.path.join(out_dir, f"rank{rank}-batch{batch}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Both batch sizes in one spawned gang: each spawn costs the CI machine two interpreters' imports."""
    out_dir = tmp_path_factory.mktemp("ulysses")
    mp.start_processes(_rank, args=(free_port(), str(out_dir)), nprocs=2, start_method="spawn")
    return out_dir


@pytest.mark.parametrize("batch", BATCHES)
def test_ulysses_on_two_ranks_equals_diffusers_attention_on_the_whole_sequence(outputs, batch):
    gathered = torch.cat([torch.load(outputs / f"rank{rank}-batch{batch}.pt") for rank in range(2)], dim=1)

    attention = _attention_module()                 # diffusers' WanAttnProcessor
    hidden, rotary = _inputs(batch)
    with torch.inference_mode():
        expected = attention(hidden, rotary_emb=rotary)
    assert gathered.shape == expected.shape
    torch.testing.assert_close(gathered, expected, rtol=1e-5, atol=1e-6)
