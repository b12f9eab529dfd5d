"""Live previews through the real mesh (issue 14 item 2): gRPC Generate's preview events before the result, REST
image streaming read by the unmodified `openai` SDK (partial images, then the completed image), and a running
video job's thumbnail variant serving its latest preview. All on the session's `families_mesh` (Wan2.1 T2V as
the default model, FLUX.1 dev and schnell)."""

from __future__ import annotations

import base64
import io
import time
import warnings

import grpc
import httpx
import openai
import pytest
from PIL import Image

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2

from .conftest import FLUX_DEV

# The SDK marks the Sora API as scheduled for shutdown; the calls are what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="openai")

PROMPT = "a red kite over a green hill"


@pytest.fixture(scope="module")
def sdk(families_mesh) -> openai.OpenAI:
    with openai.OpenAI(base_url=families_mesh.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def generate_events(mesh, **fields) -> list[gateway_pb2.GenerateEvent]:
    request = gateway_pb2.GenerateRequest(prompt=PROMPT, seed=7, **fields)
    return list(mesh.gateway_stub().Generate(request, timeout=120))


def media_bytes(events: list[gateway_pb2.GenerateEvent]) -> bytes:
    return b"".join(event.media.data for event in events if event.WhichOneof("item") == "media")


def test_grpc_generate_streams_previews_before_the_result_and_they_change_nothing(families_mesh):
    events = generate_events(families_mesh, width=48, height=32, num_frames=5, num_inference_steps=5,
                             preview_every=2)
    kinds = [event.WhichOneof("item") for event in events]
    previews = [event.preview for event in events if event.WhichOneof("item") == "preview"]
    # Steps 2 and 4 of 5 (none at the last: the result follows it), before the result.
    assert [(p.step, p.total_steps, p.index) for p in previews] == [(2, 5, 0), (4, 5, 0)]
    assert max(i for i, kind in enumerate(kinds) if kind == "preview") < kinds.index("media")
    last_step = 0
    for event in events:         # each preview right after its own step's progress
        if event.WhichOneof("item") == "progress" and event.progress.stage == "denoise":
            last_step = event.progress.step
        elif event.WhichOneof("item") == "preview":
            assert event.preview.step == last_step
    for preview in previews:
        image = Image.open(io.BytesIO(preview.data))
        # At latent resolution (48x32 / 8) and as declared, in the declared format.
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (6, 4))
        assert (preview.width, preview.height, preview.mime_type) == (6, 4, "image/png")
    # The same request without previews: the very same MP4.
    plain = generate_events(families_mesh, width=48, height=32, num_frames=5, num_inference_steps=5)
    assert "preview" not in [event.WhichOneof("item") for event in plain]
    assert media_bytes(plain) == media_bytes(events) and media_bytes(events)


def test_the_python_client_hands_previews_to_its_callback(families_mesh):
    seen: list[gateway_pb2.PreviewImage] = []
    result = GatewayClient(families_mesh.grpc_address).generate(
        gateway_pb2.GenerateRequest(prompt=PROMPT, num_inference_steps=2, preview_every=1), on_preview=seen.append,
        timeout=120)
    assert [(p.step, p.total_steps) for p in seen] == [(1, 2)] and result.media


def test_grpc_preview_every_past_the_steps_is_invalid_argument_naming_it(families_mesh):
    with pytest.raises(grpc.RpcError) as raised:
        generate_events(families_mesh, num_inference_steps=3, preview_every=4)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "preview_every" in raised.value.details()


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@pytest.mark.parametrize("output_format,pil_format", [("png", "PNG"), ("jpeg", "JPEG")])
def test_openai_sdk_streams_partial_images_then_the_completed_image(sdk, output_format, pil_format):
    stream = sdk.images.generate(model=FLUX_DEV, prompt=PROMPT, size="64x32", stream=True, partial_images=2,
                                 output_format=output_format, extra_body={"num_inference_steps": 6, "seed": 3})
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials, completed = events[:2], events[2]
    assert [event.partial_image_index for event in partials] == [0, 1]
    for event in events:
        assert (event.size, event.output_format, event.background) == ("64x32", output_format, "opaque")
        image = decoded(event.b64_json)
        # Partial images too come at the size and in the format asked, to take the final image's place.
        assert (image.format, image.size) == (pil_format, (64, 32))
    # ceil(6 / 3) = every 2 steps: the previews of steps 2 and 4.
    assert [event.model_extra["step"] for event in partials] == [2, 4]
    assert completed.usage.total_tokens == 0
    if output_format == "png":
        # The streamed final image is the non-streamed one, byte for byte.
        plain = sdk.images.generate(model=FLUX_DEV, prompt=PROMPT, size="64x32",
                                    extra_body={"num_inference_steps": 6, "seed": 3})
        assert base64.b64decode(plain.data[0].b64_json) == base64.b64decode(completed.b64_json)


def test_stream_without_partial_images_sends_only_the_completed_image(sdk):
    events = list(sdk.images.generate(model=FLUX_DEV, prompt=PROMPT, size="64x32", stream=True,
                                      extra_body={"num_inference_steps": 3}))
    assert [event.type for event in events] == ["image_generation.completed"]


@pytest.mark.parametrize("body,param", [
    ({"preview_every": 1}, "preview_every"),                   # no stream: nothing would carry the previews
    ({"stream": True, "preview_every": 9}, "preview_every"),   # past num_inference_steps (3)
    ({"stream": True, "n": 2}, "n"),
    ({"stream": True, "response_format": "url"}, "response_format"),
])
def test_streaming_options_the_server_cannot_honour_are_400_naming_them(families_mesh, body, param):
    response = httpx.post(f"{families_mesh.http_url}/v1/images/generations", timeout=60, json={
        "model": FLUX_DEV, "prompt": PROMPT, "size": "64x32", "num_inference_steps": 3, **body})
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == param


def test_a_running_video_jobs_thumbnail_is_its_latest_preview(sdk, families_mesh):
    # Enough steps that the job is still denoising while the preview is fetched (each step is a transformer
    # forward; the tiny model at 128x64x9 takes a few seconds in all on the CI machine).
    video = sdk.videos.create(prompt=PROMPT, size="128x64", extra_body={
        "num_frames": 9, "num_inference_steps": 40, "preview_every": 1, "seed": 5})
    url = f"{families_mesh.http_url}/v1/videos/{video.id}/content"
    deadline = time.monotonic() + 120
    preview = None
    while time.monotonic() < deadline:
        response = httpx.get(url, params={"variant": "thumbnail"}, timeout=30)
        status = sdk.videos.retrieve(video.id).status
        if response.status_code == 200 and status == "in_progress":
            preview = response
            break
        assert status in ("queued", "in_progress"), f"the job ended ({status}) before a preview was seen"
        assert response.status_code == 409 and response.json()["error"]["code"] == "video_not_ready"
        time.sleep(0.05)
    assert preview is not None, "no preview within the deadline"
    assert preview.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(preview.content))
    assert (image.format, image.size) == ("WEBP", (128 // 8, 64 // 8))    # the latent-resolution preview
    sdk.videos.delete(video.id)          # cancels it: no need to wait for the rest of the steps



def test_a_client_hanging_up_on_an_image_stream_cancels_its_job(families_mesh):
    # The first partial image comes at step 10 of 40: 30 steps left for the hang-up to stop.
    body = {"model": FLUX_DEV, "prompt": PROMPT, "size": "64x64", "stream": True, "partial_images": 3,
            "num_inference_steps": 40}
    marker = "(the client went away): cancelling job img_"
    earlier = sum(marker in line for line in list(families_mesh.log))
    with httpx.stream("POST", f"{families_mesh.http_url}/v1/images/generations", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "event: image_generation.partial_image":
                break                    # the first partial image: the job is running; hang up now
    deadline = time.monotonic() + 30
    job = None
    while time.monotonic() < deadline:
        log = "".join(families_mesh.log)
        gone = [line for line in log.splitlines() if marker in line][earlier:]
        if gone:
            job = gone[-1].rsplit("job ", 1)[1].strip()
            if f"job {job} cancelled" in log:
                break
        time.sleep(0.1)
    assert job is not None and f"job {job} cancelled" in "".join(families_mesh.log)
