"""FLUX's transformer split by a real 2-rank gloo gang, against diffusers' own forward on one process.

A FluxTransformer2DModel with 4 heads (so each Ulysses or TP rank holds two: a head-order mistake shows), two
samples (the exchange copies differently for more than one), 7 text tokens and 15 image tokens (odd: the second
rank's slice ends in padding). Each layout (Ulysses 2, Ring 2, TP 2 read from the saved checkpoint) runs
FluxParallelTransformer on services/denoiser/gang/distributed.py's Gang. The one-device processor
(`install_joint_attention`, what `FluxFamily.install_kernels` installs) must give diffusers' numbers exactly.

And the plan as the gang reads it at start-up: heads and widths from the config, a layout FLUX cannot take refused
naming its numbers, and TP's slices of the single-stream proj_out (its [attention, MLP] halves split apart).
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp

from services.denoiser.gang.launcher import free_port

LAYOUTS = {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2), "tp2": dict(tp=2)}
TEXT_TOKENS, GRID = 7, (3, 5)           # 15 image tokens


def _transformer(guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(11)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                                   pooled_projection_dim=10, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    return model.eval()


def _inputs() -> dict:
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(5)
    height, width = GRID
    return dict(
        hidden_states=torch.randn(2, height * width, 16, generator=generator),
        encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 12, generator=generator),
        pooled_projections=torch.randn(2, 10, generator=generator),
        timestep=torch.tensor([0.7, 0.3]),
        guidance=torch.tensor([3.5, 3.5]),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, height, width, "cpu", torch.float32),
        # Text positions are all zero in FluxPipeline; distinct ones here, so a text rotary slice mistake shows.
        txt_ids=torch.arange(TEXT_TOKENS * 3, dtype=torch.float32).view(TEXT_TOKENS, 3) % 5,
    )


def _rank(rank: int, ports: list[int], folder: str, out_dir: str) -> None:
    from diffusers import FluxTransformer2DModel

    from services.common.platform import PLATFORMS
    from services.denoiser.gang.attention import LSE_KERNELS
    from services.denoiser.gang.distributed import Gang
    from services.denoiser.gang.layout import GangLayout
    from services.families.flux_parallel import FluxParallelTransformer, load_flux_sharded

    platform = PLATFORMS["cpu"]
    torch.set_num_threads(1)
    for (name, degrees), port in zip(LAYOUTS.items(), ports, strict=True):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        gang = Gang(GangLayout(**degrees), platform, rank, rank)
        try:
            if degrees.get("tp"):
                model = load_flux_sharded(FluxTransformer2DModel, pathlib.Path(folder), gang.axis("tp"),
                                          torch.float32, gang.device)
            else:
                model = FluxTransformer2DModel.from_pretrained(folder).eval()
            transformer = FluxParallelTransformer(model, gang, LSE_KERNELS[platform.lse_attention])
            with torch.inference_mode():
                out = transformer(**_inputs(), return_dict=False)[0]
            torch.save(out, os.path.join(out_dir, f"{name}-rank{rank}.pt"))
        finally:
            gang.close()


@pytest.fixture(scope="module")
def gang_outputs(tmp_path_factory) -> tuple[pathlib.Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("flux-gang")
    _transformer().save_pretrained(root / "transformer")
    ports = [free_port() for _ in LAYOUTS]
    mp.start_processes(_rank, args=(ports, str(root / "transformer"), str(root)), nprocs=2, start_method="spawn")
    with torch.inference_mode():
        expected = _transformer()(**_inputs(), return_dict=False)[0]        # diffusers' processor and forward
    return root, expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_two_rank_gang_returns_diffusers_output(gang_outputs, layout):
    root, expected = gang_outputs
    for rank in range(2):                         # every rank gathers the whole output
        got = torch.load(root / f"{layout}-rank{rank}.pt")
        assert got.shape == expected.shape
        error = float((got - expected).norm() / expected.norm())
        assert error <= 1e-5, f"{layout} rank {rank}: relative L2 error {error:.2e}"


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_the_one_device_processor_gives_diffusers_numbers_exactly(guidance_embeds):
    from services.families.flux_attention import install_joint_attention

    inputs = _inputs()
    if not guidance_embeds:
        inputs.pop("guidance")
    model = _transformer(guidance_embeds)
    with torch.inference_mode():
        expected = model(**inputs, return_dict=False)[0]
        install_joint_attention(model)
        got = model(**inputs, return_dict=False)[0]
    assert torch.equal(got, expected)


# The plan, read from the config (tiny FLUX: 2 heads of 16, width 32) ---------------------------------------------

@pytest.fixture(scope="module")
def flux_models(tmp_path_factory) -> dict:
    from services.common.models import resolve_model_dir
    from services.common.tiny import write_tiny

    root = tmp_path_factory.mktemp("flux-plan")
    return {family: resolve_model_dir(write_tiny(root / f"{family}-tiny", family))
            for family in ("flux", "flux-schnell")}


@pytest.mark.parametrize("family", ["flux", "flux-schnell"])
def test_the_flux_plan_declares_its_heads_and_widths(flux_models, family):
    from services.denoiser.gang.engine import check_gang_model
    from services.denoiser.gang.layout import GangLayout

    model = flux_models[family]
    for layout in (GangLayout(ulysses=2), GangLayout(ring=2), GangLayout(cfg=2), GangLayout(tp=2),
                   GangLayout(cfg=2, ring=2, ulysses=2)):
        plan = check_gang_model(model, layout)
    assert plan.heads == 2 and dict(plan.tp_widths) == {"mlp_hidden_dim": 128}
    assert plan.tensor_parallel is not None


def test_a_layout_flux_cannot_take_fails_at_start_up_naming_its_numbers(flux_models):
    from services.denoiser.gang.engine import check_gang_model
    from services.denoiser.gang.layout import GangLayout, LayoutError

    with pytest.raises(LayoutError, match="flux-tiny: the model has 2 attention heads, not divisible by "
                                          "ulysses 2 × tp 2 = 4; choose degrees whose product divides 2"):
        check_gang_model(flux_models["flux"], GangLayout(ulysses=2, tp=2))
    with pytest.raises(LayoutError, match="flux-schnell-tiny: the model has 2 attention heads, not divisible by "
                                          "ulysses 4"):
        check_gang_model(flux_models["flux-schnell"], GangLayout(ulysses=4))


@pytest.mark.parametrize("index", [0, 1])
def test_tensor_parallel_reads_each_ranks_share_of_both_halves_of_proj_out(flux_models, index):
    """The single-stream proj_out reads [attention output, MLP hidden]: a TP rank's input columns are its share of
    each (as its own activations are laid out), not one contiguous slice. q/k norms are per head: kept whole."""
    from safetensors.torch import load_file

    from services.denoiser.axes import AxisGroup
    from services.denoiser.gang.tensor_parallel import RowParallelLinear
    from services.families.flux_parallel import load_flux_sharded

    model = flux_models["flux"]
    tp = AxisGroup(group=None, ranks=[0, 1], index=index)
    sharded = load_flux_sharded(model.component_class("transformer"), model.path / "transformer", tp,
                                torch.float32, torch.device("cpu"))
    whole = load_file(model.path / "transformer" / "diffusion_pytorch_model.safetensors")
    block = sharded.single_transformer_blocks[0]
    attention, mlp = whole["single_transformer_blocks.0.proj_out.weight"].split([32, 128], dim=1)
    expected = torch.cat([attention.chunk(2, dim=1)[index], mlp.chunk(2, dim=1)[index]], dim=1)
    assert isinstance(block.proj_out, RowParallelLinear) and torch.equal(block.proj_out.weight, expected)
    assert torch.equal(block.proj_mlp.weight, whole["single_transformer_blocks.0.proj_mlp.weight"].chunk(2)[index])
    double = sharded.transformer_blocks[0].attn
    assert double.heads == 1
    assert torch.equal(double.add_k_proj.weight, whole["transformer_blocks.0.attn.add_k_proj.weight"].chunk(2)[index])
    assert torch.equal(double.norm_added_k.weight, whole["transformer_blocks.0.attn.norm_added_k.weight"])
    assert all(p.device.type == "cpu" for p in sharded.parameters())
