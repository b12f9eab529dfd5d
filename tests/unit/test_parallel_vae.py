"""Row-parallel VAE (services/decoder/parallel_vae.py): 2 and 4 CPU ranks (gloo) decode -- and Wan encodes -- what
one process does.

One world of 4 forked ranks serves both sizes: it decodes with all 4, then as two 2-rank groups ({0, 1}, {2, 3}),
each on its own. The latents are 9 rows high, which divides by neither 2 nor 4 (slabs of 5+4 and 3+2+2+2 rows),
and Wan's have 2 or 3 latent frames, so its causal convolutions run with their cached frames. The reference is the
same seeded VAE in this process with nothing installed on it: diffusers' own decode and encode.

What is checked, for every output (raw VAE frames, the encoder's raw latent moments), with
scale = max(1, max |one process|):
- in float64, max |ranks - one process| <= 1e-10 x scale: the split computes the very same sums (a wrong halo,
  norm statistic or seam is off by 1e-3 or more);
- in float32, max |ranks - one process| <= 1e-5 x scale, or, where one process's own float32 rounding is larger
  (its max |float32 - float64|), within twice that. Measured: the tiny 3-channel Wan2.1 VAE's RMS norm (a unit
  vector over 3 channels) amplifies float32 rounding to 2.0e-5 at a few pixels in one process already, so no
  other order of the same float32 sums can promise 1e-5 there; FLUX's and Wan2.2's stay below 1e-5.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from torch import nn

from services.decoder.parallel_vae import RowParallelVae, RowSplit, gather_rows, row_sizes, slab
from services.families.base import RowSplitPlan

WORLD = 4
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def build_cases() -> dict[str, dict]:
    """Each VAE (seeded), its plan and its inputs."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

    from services.common.tiny import flux, wan22
    from services.common.tiny_model import _build_vae

    wan_plan = RowSplitPlan(causal_convs=(WanCausalConv3d,), frame_attentions=(WanAttentionBlock,), encoder="encoder")
    cases = {}
    torch.manual_seed(0)
    cases["wan2.1"] = dict(vae=_build_vae(), plan=wan_plan, latents=torch.randn(1, 16, 3, 9, 6),
                           pixels=torch.rand(1, 3, 5, 72, 48) * 2 - 1)
    # Wan2.2 TI2V-5B's VAE: residual up/down blocks (pixel-shuffle shortcuts) and 2x2 patchify around the encoder.
    cases["wan2.2"] = dict(vae=_build_vae(**wan22._TI2V_VAE), plan=wan_plan,
                           latents=torch.randn(1, wan22.TI2V_Z_DIM, 2, 9, 5),
                           pixels=torch.rand(1, 3, 5, 144, 80) * 2 - 1)
    # FLUX.1's AutoencoderKL: GroupNorm everywhere, diffusers' Attention in the mid-block; a batch of two.
    cases["flux"] = dict(vae=flux._build_vae(), plan=RowSplitPlan(frame_attentions=(Attention,)),
                         latents=torch.randn(2, 16, 9, 6), pixels=None)
    return cases


@torch.inference_mode()
def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


@torch.inference_mode()
def encode(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels.to(vae.dtype), return_dict=False)[0].parameters       # the encoder's raw moments


def _rank(rank: int, port: int, cases: dict[str, dict], out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)        # a forked child runs no OpenMP pool of its parent's (as DataLoader workers)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]        # every rank makes every group, in order
        splits = {"4": RowSplit.of(None), "2": RowSplit.of(pairs[rank // 2])}
        for name, case in cases.items():
            vae = case["vae"]
            parallel = RowParallelVae(vae, case["plan"])
            for dtype_name, dtype in DTYPES.items():
                vae.type(dtype)      # (ModelMixin.to warns about dtype casts; the weights are ours)
                for size, split in splits.items():
                    latents = case["latents"]
                    with parallel.decoding(split):
                        mine = decode(vae, slab(latents, row_sizes(latents.shape[-2], split.size), split.rank))
                    whole = gather_rows(mine, split)
                    if split.first:
                        torch.save(whole, pathlib.Path(out_dir, f"{name}-{dtype_name}-decode-{size}-rank{rank}.pt"))
                    if case["pixels"] is not None:
                        with parallel.encoding(split):
                            moments = encode(vae, case["pixels"])
                        # Every rank gets the whole latents: each saves its own, so all are checked.
                        torch.save(moments, pathlib.Path(out_dir, f"{name}-{dtype_name}-encode-{size}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_like_one_process(got: torch.Tensor, one: dict[str, torch.Tensor], dtype_name: str, what: str) -> None:
    expected = one[dtype_name]
    assert got.dtype == expected.dtype and got.shape == expected.shape, f"{what}: {got.dtype} {list(got.shape)}"
    scale = max(1.0, float(expected.abs().max()))
    bound = TOLERANCE[dtype_name] * scale
    if dtype_name == "float32":
        bound = max(bound, 2 * float((one["float32"].double() - one["float64"]).abs().max()))
    error = float((got - expected).abs().max())
    assert error <= bound, f"{what} ({dtype_name}): max abs error {error:.3g} > {bound:.3g}"


def test_two_and_four_ranks_decode_and_encode_what_one_process_does(tmp_path):
    import torch.multiprocessing as mp

    from services.denoiser.gang.launcher import free_port

    cases = build_cases()
    references = {}
    for name, case in cases.items():
        vae = case["vae"]
        references[name, "decode"] = {d: decode(vae.type(dtype), case["latents"]) for d, dtype in DTYPES.items()}
        if case["pixels"] is not None:
            references[name, "encode"] = {d: encode(vae.type(dtype), case["pixels"]) for d, dtype in DTYPES.items()}
        vae.type(torch.float32)
        # The latents reach the frames (a VAE that ignored them would make any split look exact).
        assert float(references[name, "decode"]["float32"].std()) > 1e-3, name
    # Forked, not spawned: the ranks start with the VAEs already built (spawning re-imports diffusers, ~8 s of CPU
    # a rank), and install the wrappers on their own copies.
    mp.start_processes(_rank, args=(free_port(), cases, str(tmp_path)), nprocs=WORLD, start_method="fork")
    for name, case in cases.items():
        for dtype_name in DTYPES:
            for size, leaders in (("4", [0]), ("2", [0, 2])):
                for leader in leaders:
                    got = torch.load(tmp_path / f"{name}-{dtype_name}-decode-{size}-rank{leader}.pt")
                    assert_like_one_process(got, references[name, "decode"], dtype_name,
                                            f"{name} decode, {size} ranks (the group of rank {leader})")
                if case["pixels"] is not None:
                    for rank in range(WORLD):
                        got = torch.load(tmp_path / f"{name}-{dtype_name}-encode-{size}-rank{rank}.pt")
                        assert_like_one_process(got, references[name, "encode"], dtype_name,
                                                f"{name} encode, {size} ranks (rank {rank})")


def test_rows_split_as_evenly_as_they_go_and_every_rank_gets_one():
    assert row_sizes(9, 4) == [3, 2, 2, 2]
    assert row_sizes(9, 2) == [5, 4]
    assert row_sizes(8, 4) == [2, 2, 2, 2]
    assert row_sizes(1, 1) == [1]
    with pytest.raises(ValueError, match="3 rows cannot give each of 4 ranks one"):
        row_sizes(3, 4)


@pytest.mark.parametrize("layer", [nn.ReflectionPad2d(1), nn.Upsample(scale_factor=2, mode="bilinear"),
                                   nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")])
def test_a_vae_with_a_layer_the_split_cannot_reproduce_is_refused_at_install(layer):
    with pytest.raises(ValueError, match="one device|cannot split"):
        RowParallelVae(nn.Sequential(nn.Conv2d(2, 2, 1), layer), RowSplitPlan())


def test_outside_a_split_the_wrapped_layers_compute_as_before():
    torch.manual_seed(1)
    vae = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ZeroPad2d((0, 1, 0, 1)),
                        nn.Conv2d(4, 2, 3, stride=2))
    x = torch.randn(1, 2, 6, 5)
    before = vae(x)
    RowParallelVae(vae, RowSplitPlan())
    assert torch.equal(vae(x), before)

