"""Live previews in the denoiser: the family's latent -> RGB projection (the published factor tables, the
deterministic stand-in for other channel counts, the middle frame of a video), the loop sending one every k steps
before the last, with the right shape, and the result bit-identical with previews on, off, or not listened to."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny.flux import write_tiny_flux
from services.common.tiny_model import write_tiny_model
from services.denoiser.engine import DenoiserEngine
from services.families.base import DenoiseRun, Sampling
from services.families.flux import FLUX1_LATENT_RGB, FluxFamily
from services.families.preview import LatentRGB, first_channels_rgb, preview_frame, project
from services.families.wan import WAN21_LATENT_RGB, WanFamily


def test_the_published_tables_have_one_rgb_row_per_latent_channel():
    for table in (WAN21_LATENT_RGB, FLUX1_LATENT_RGB):
        assert table.channels == 16 and all(len(row) == 3 for row in table.factors) and len(table.bias) == 3
    assert WanFamily.latent_rgb == (WAN21_LATENT_RGB,) and FluxFamily.latent_rgb == (FLUX1_LATENT_RGB,)


def test_a_latent_channel_maps_to_its_row_plus_the_bias_scaled_from_minus_one_one():
    # Channel 2 alone at 1.0: each colour is factors[2] + bias, then (x + 1) / 2 * 255 (ComfyUI's scaling).
    latents = torch.zeros(1, 16, 2, 3)
    latents[:, 2] = 1.0
    rgb = project(latents, (WAN21_LATENT_RGB,))
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 2, 3, 3)
    expected = [int((f + b + 1) / 2 * 255) for f, b in zip(WAN21_LATENT_RGB.factors[2], WAN21_LATENT_RGB.bias,
                                                            strict=True)]
    assert rgb[0, 1, 2].tolist() == pytest.approx(expected, abs=1)
    assert (rgb == rgb[0, 0, 0]).all()          # the same everywhere: one map for every position


def test_video_latents_preview_their_middle_frame():
    latents = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1, 1).expand(2, 16, 5, 4, 6)
    assert torch.equal(preview_frame(latents), latents[:, :, 2])
    with pytest.raises(ValueError, match="neither"):
        preview_frame(torch.zeros(16, 4))


def test_a_channel_count_no_table_fits_takes_the_first_channels_stretched_deterministically():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 48, 3, 5, 7, generator=generator)      # Wan2.2's 48 channels: no table here
    rgb = project(latents, (WAN21_LATENT_RGB,))
    assert rgb.shape == (2, 5, 7, 3) and rgb.dtype == torch.uint8
    assert torch.equal(rgb, project(latents.clone(), (WAN21_LATENT_RGB,)))
    for output in range(2):       # each output's channel stretched to its own min..max
        for channel in range(3):
            assert rgb[output, ..., channel].min() == 0 and rgb[output, ..., channel].max() == 255
    one_channel = first_channels_rgb(torch.randn(1, 1, 4, 4, generator=generator))
    assert (one_channel[..., 0] == one_channel[..., 1]).all() and (one_channel[..., 1] == one_channel[..., 2]).all()


def test_a_table_is_chosen_by_channel_count():
    four = LatentRGB(factors=((1.0, 0.0, 0.0),) * 4)
    latents = torch.full((1, 4, 1, 1), 0.25)
    assert project(latents, (WAN21_LATENT_RGB, four))[0, 0, 0].tolist() == [255, 127, 127]


class FlowRun(DenoiseRun):
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def step_call(self, latents, t, index):
        raise NotImplementedError


def test_the_estimate_is_flow_matchings_clean_latents():
    # FlowMatchEuler's last step goes to sigma 0, so what it returns there is exactly x0 = x_t - sigma_t * v.
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(3)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 2, 2, generator=generator)
    for index, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=generator)
        estimate = FlowRun(scheduler).denoised(x, v, index)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(estimate, x)


def random_conditioning(engine: DenoiserEngine, params: Sampling) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shapes = engine.denoising.warmup_conditioning(params, 16)
    return {name: torch.randn(tensor.shape, generator=generator) for name, tensor in shapes.items()}


def run_with_previews(engine: DenoiserEngine, params: Sampling, tensors) -> tuple[torch.Tensor, list]:
    previews: list[tuple[int, int, torch.Tensor]] = []
    steps: list[int] = []
    result = engine.denoise(params, tensors, on_step=lambda done, total: steps.append(done),
                            on_preview=lambda done, total, image: previews.append((done, total, image, len(steps))))
    return result, previews


@pytest.fixture(scope="module")
def wan_engine(tmp_path_factory) -> DenoiserEngine:
    return DenoiserEngine(resolve_model_dir(write_tiny_model(tmp_path_factory.mktemp("previews") / "wan")),
                          PLATFORMS["cpu"])


def test_previews_arrive_every_k_steps_before_the_last_and_change_nothing(wan_engine):
    off = Sampling("off", 48, 32, 5, 5, 5.0, 3, num_outputs=2)
    tensors = random_conditioning(wan_engine, off)
    baseline = wan_engine.denoise(off, tensors)

    on = Sampling("on", 48, 32, 5, 5, 5.0, 3, num_outputs=2, preview_every=2)
    result, previews = run_with_previews(wan_engine, on, tensors)
    # Steps 2 and 4 of 5 (5 is the last: its latents follow at once), each after its own step's progress.
    assert [(done, total, steps_seen) for done, total, _, steps_seen in previews] == [(2, 5, 2), (4, 5, 4)]
    for _, _, image, _ in previews:
        # Both outputs, at latent resolution (32x48 px / 8), RGB bytes, on the CPU.
        assert image.shape == (2, 4, 6, 3) and image.dtype == torch.uint8 and image.device.type == "cpu"
    assert not torch.equal(previews[0][2], previews[1][2])      # the estimate moves as the denoise goes on
    assert torch.equal(result, baseline)                        # bit-identical: a preview only reads
    # Asked for but not listened to (no callback): no preview work, the same result.
    assert torch.equal(wan_engine.denoise(on, tensors), baseline)


def test_wan_estimates_only_the_frame_it_previews(wan_engine):
    params = Sampling("r", 48, 32, 9, 4, 5.0, 3)
    run = wan_engine.denoising.start(params, random_conditioning(wan_engine, params), wan_engine.device)
    noise = torch.randn(run.latents.shape, generator=torch.Generator().manual_seed(4))
    sliced = run.preview_latents(run.latents, noise, 1)
    assert sliced.shape[2] == 1          # 3 latent frames: only the middle one is estimated
    whole = run.layout(run.denoised(run.latents, noise, 1))
    assert torch.equal(wan_engine.family.preview(sliced), wan_engine.family.preview(whole))


def test_preview_every_past_the_steps_is_refused_naming_it(wan_engine):
    params = Sampling("r", 48, 32, 1, 2, 5.0, 3, preview_every=3)
    with pytest.raises(InvalidArgument) as raised:
        wan_engine.check(params)
    assert raised.value.field == "preview_every"


def test_flux_previews_its_unpacked_latents(tmp_path):
    engine = DenoiserEngine(resolve_model_dir(write_tiny_flux(tmp_path / "flux")), PLATFORMS["cpu"])
    params = Sampling("f", 64, 32, 1, 3, 3.5, 5, preview_every=1)
    tensors = random_conditioning(engine, params)
    result, previews = run_with_previews(engine, params, tensors)
    assert [done for done, *_ in previews] == [1, 2]
    # The VAE's layout [n, 16, H/8, W/8] previewed: one pixel per unpacked latent position.
    assert result.shape == (1, 16, 4, 8)
    assert all(image.shape == (1, 4, 8, 3) for _, _, image, _ in previews)
    assert torch.equal(result, engine.denoise(Sampling("f", 64, 32, 1, 3, 3.5, 5), tensors))


def test_partial_images_n_give_at_most_n_evenly_spaced_previews_before_the_last_step():
    from services.gateway.rest_stream import preview_every_for

    assert preview_every_for(8, 2) == 3 and preview_every_for(6, 2) == 2 and preview_every_for(8, 0) == 0
    for steps in range(1, 60):
        for partials in (1, 2, 3):
            every = preview_every_for(steps, partials)
            previews = [step for step in range(1, steps) if step % every == 0]     # as the engine's loop
            assert len(previews) <= partials
            if steps % (partials + 1) == 0:      # steps that split evenly give exactly N
                assert len(previews) == partials


def test_the_gateway_encodes_each_outputs_preview_and_drops_a_malformed_one(caplog):
    import io

    from PIL import Image

    from diffmesh.v1 import denoiser_pb2
    from services.common.tensors import to_proto
    from services.gateway.pipeline import preview_images

    pixels = torch.arange(2 * 4 * 6 * 3, dtype=torch.uint8).view(2, 4, 6, 3)
    preview = denoiser_pb2.LatentPreview(step=3, total_steps=7, image=to_proto(pixels))
    events = preview_images(preview, 2)
    assert [(e.index, e.step, e.total_steps, e.width, e.height, e.mime_type) for e in events] == [
        (0, 3, 7, 6, 4, "image/png"), (1, 3, 7, 6, 4, "image/png")]
    for event, expected in zip(events, pixels, strict=True):
        image = Image.open(io.BytesIO(event.data))
        assert image.format == "PNG" and torch.equal(torch.tensor(list(image.getdata())).view(4, 6, 3),
                                                     expected.long())
    # Wrong count of outputs, a float tensor, bytes that do not match the shape: the preview is dropped, said so.
    bad = [denoiser_pb2.LatentPreview(step=1, total_steps=2, image=to_proto(pixels[:1])),
           denoiser_pb2.LatentPreview(step=1, total_steps=2, image=to_proto(pixels.float())),
           denoiser_pb2.LatentPreview(step=1, total_steps=2, image=dict(dtype="uint8", shape=[2, 4, 6, 3],
                                                                         data=b"\0" * 5))]
    for message in bad:
        assert preview_images(message, 2) == []
    assert caplog.text.count("dropping a preview") == 3
