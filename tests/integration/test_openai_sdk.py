"""The official `openai` SDK, unmodified, against the real gateway: images, videos, models, errors (issue 14).

Images run on the session's FLUX mesh (`families_mesh`), videos on the Wan one (`mesh`). What needs gateway flags
that `diffmesh up` does not take (aliases by --served-model-name, API keys, a small body limit) runs on one more
gateway process in front of the Wan mesh's stages: a gateway, not a mesh, so it starts in seconds.
"""

from __future__ import annotations

import base64
import io
import os
import pathlib
import subprocess
import sys
import time
import warnings

import grpc
import httpx
import openai
import pytest
from openai.types import Video
from PIL import Image

from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import FLUX_SCHNELL

# The SDK marks the Sora API as scheduled for shutdown; the calls are what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="openai")

ALIASES = ("wan-alias", "wan-second-name")
KEY_A, KEY_B = "key-a-for-tests", "key-b-for-tests"
MAX_BODY = 64 << 10
FAST = {"num_inference_steps": 1}
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def sdk(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    with sdk(mesh.http_url) as c:
        yield c


@pytest.fixture(scope="module")
def flux(families_mesh) -> openai.OpenAI:
    with sdk(families_mesh.http_url) as c:
        yield c


class Gateway:
    def __init__(self, process: subprocess.Popen, grpc_address: str, http_url: str, data_dir: pathlib.Path,
                 log: pathlib.Path) -> None:
        self.process, self.grpc_address, self.http_url, self.data_dir, self.log = (
            process, grpc_address, http_url, data_dir, log)


@pytest.fixture(scope="module")
def gateway(mesh, tmp_path_factory) -> Gateway:
    """A second gateway on the Wan mesh's stages serving the model under three names, with two API keys and a
    64 KiB body limit."""
    tmp = tmp_path_factory.mktemp("sdk-gateway")
    port_file, data_dir, log = tmp / "ports", tmp / "data", tmp / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway.server", "--grpc-port", "0", "--http-port", "0",
         "--served-model-name", mesh.model, *ALIASES, "--port-file", str(port_file), "--grace", "1",
         "--data-dir", str(data_dir), "--api-key", KEY_A, "--api-key", KEY_B, "--max-body-bytes", str(MAX_BODY),
         *[f"--{stage}={address}" for stage, address in mesh.stages.items()]],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, "gateway did not start:\n" + log.read_text()
        time.sleep(0.1)
    grpc_port, http_port = port_file.read_text().split()[:2]
    yield Gateway(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", data_dir, log)
    process.terminate()
    assert process.wait(timeout=30) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client_a(gateway) -> openai.OpenAI:
    with sdk(gateway.http_url, KEY_A) as c:
        yield c


@pytest.fixture(scope="module")
def client_b(gateway) -> openai.OpenAI:
    with sdk(gateway.http_url, KEY_B) as c:
        yield c


def decode(b64: str) -> tuple[bytes, Image.Image]:
    data = base64.b64decode(b64)
    return data, Image.open(io.BytesIO(data))


def small_video(client: openai.OpenAI, **extra) -> Video:
    """A video job the tiny Wan model finishes in a second or two, through the SDK's multipart create."""
    body = {"num_frames": 5, **FAST, **extra.pop("extra_body", {})}
    return client.videos.create_and_poll(prompt=extra.pop("prompt", "waves"), size=extra.pop("size", "32x32"),
                                         extra_body=body, poll_interval_ms=100, **extra)


# -- images ------------------------------------------------------------------------------------------------------

def test_images_generate_b64_json_decodes_to_the_size_asked(flux):
    reply = flux.images.generate(model=FLUX_SCHNELL, prompt="a lighthouse", size="64x32", n=2,
                                 extra_body={"num_inference_steps": 2, "seed": 4})
    assert len(reply.data) == 2 and reply.output_format == "png" and reply.size == "64x32"
    for item in reply.data:
        data, image = decode(item.b64_json)
        assert data.startswith(MAGIC["png"]) and image.format == "PNG" and image.size == (64, 32)


@pytest.mark.parametrize("output_format,pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_images_come_encoded_in_the_output_format_asked(flux, output_format, pil_format):
    extra = {} if output_format == "png" else {"output_compression": 90}
    reply = flux.images.generate(model=FLUX_SCHNELL, prompt="a fox", size="48x32", output_format=output_format,
                                 extra_body={**FAST, "seed": 5}, **extra)
    data, image = decode(reply.data[0].b64_json)
    assert reply.output_format == output_format
    assert data.startswith(MAGIC[output_format]) and image.format == pil_format and image.size == (48, 32)
    if output_format == "webp":
        assert data[8:12] == b"WEBP"


def test_output_compression_is_the_jpeg_quality(flux):
    sizes = {}
    for compression in (10, 95):
        reply = flux.images.generate(model=FLUX_SCHNELL, prompt="a field", size="128x128", output_format="jpeg",
                                     output_compression=compression, extra_body={"num_inference_steps": 2, "seed": 6})
        data, image = decode(reply.data[0].b64_json)
        assert image.format == "JPEG"
        sizes[compression] = len(data)
    assert sizes[10] < sizes[95]


def test_images_url_serves_the_format_asked(flux, families_mesh):
    reply = flux.images.generate(model=FLUX_SCHNELL, prompt="a boat", size="32x32", response_format="url",
                                 output_format="webp", extra_body=FAST)
    url = reply.data[0].url
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(got.content))
    assert image.format == "WEBP" and image.size == (32, 32)
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(got.content)


def test_size_auto_is_the_default_size(flux):
    auto = flux.images.generate(model=FLUX_SCHNELL, prompt="a hill", size="auto", extra_body=FAST)
    omitted = flux.images.generate(model=FLUX_SCHNELL, prompt="a hill", extra_body=FAST)
    # The test mesh's gateway runs with --default-size 32x32, over the model's own default.
    assert decode(auto.data[0].b64_json)[1].size == decode(omitted.data[0].b64_json)[1].size == (32, 32)
    assert auto.size == "32x32"


def test_openai_metadata_and_default_choices_are_accepted(flux):
    reply = flux.images.generate(model=FLUX_SCHNELL, prompt="a tree", size="32x32", user="someone",
                                 quality="auto", background="opaque", moderation="auto", extra_body=FAST)
    assert decode(reply.data[0].b64_json)[1].size == (32, 32)


@pytest.mark.parametrize("kwargs,param", [
    ({"quality": "high"}, "quality"),
    ({"style": "vivid"}, "style"),
    ({"background": "transparent"}, "background"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 50}, "output_compression"),      # with png
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"size": "big"}, "size"),
])
def test_an_unsupported_image_parameter_is_400_naming_it(flux, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        flux.images.generate(model=FLUX_SCHNELL, prompt="x", **kwargs)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.body["message"].startswith(param)


def test_an_unknown_model_is_404(flux):
    with pytest.raises(openai.NotFoundError) as caught:
        flux.images.generate(model="no-such-model", prompt="x", extra_body=FAST)
    assert "no-such-model" in caught.value.message


# -- videos ------------------------------------------------------------------------------------------------------

def test_create_and_poll_reaches_completed_with_every_field_of_openais_video(client, mesh):
    video = small_video(client, prompt="a river at night")
    assert video.status == "completed" and video.progress == 100 and video.error is None
    raw = client.videos.with_raw_response.retrieve(video.id).http_response.json()
    assert set(Video.model_fields) <= set(raw)
    assert raw["object"] == "video" and raw["model"] == mesh.model and raw["prompt"] == "a river at night"
    assert raw["remixed_from_video_id"] is None and raw["size"] == "32x32"
    assert isinstance(raw["seconds"], str) and raw["seconds"] == "0.25"      # 5 frames at 16 fps
    assert raw["completed_at"] >= raw["created_at"]
    assert raw["expires_at"] == raw["completed_at"] + 24 * 3600            # the default --retention-age
    assert video.model_extra["num_frames"] == 5 and isinstance(video.model_extra["seed"], int)


def test_video_seconds_default_to_openais_4(client):
    video = client.videos.create(prompt="clouds", size="32x32", extra_body=FAST)
    assert video.seconds == "4" and video.model_extra["num_frames"] == 65 and video.status in ("queued", "in_progress")
    assert client.videos.poll(video.id, poll_interval_ms=100).status == "completed"


def test_videos_create_takes_json_too(client):
    video = client.post("/videos", cast_to=Video, body={"prompt": "rain", "size": "32x32", "seconds": "0.5",
                                                        "fps": 8, **FAST})
    assert video.model_extra["num_frames"] == 5
    assert client.videos.poll(video.id, poll_interval_ms=100).status == "completed"


def test_polling_is_paced_by_the_server(client, mesh):
    video = client.videos.create(prompt="slow", size="32x32", extra_body={"num_frames": 5, "num_inference_steps": 8})
    reply = client.videos.with_raw_response.retrieve(video.id)
    if reply.parse().status in ("queued", "in_progress"):
        assert int(reply.headers["openai-poll-after-ms"]) > 0
    assert client.videos.poll(video.id).status == "completed"
    assert "openai-poll-after-ms" not in client.videos.with_raw_response.retrieve(video.id).headers


def test_an_unknown_video_parameter_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(prompt="x", extra_body={"style": "noir"})
    assert caught.value.param == "style"


def test_download_content_variants_have_their_media_types(client):
    video = small_video(client, size="48x32", extra_body={"num_frames": 9})
    mp4 = client.videos.download_content(video.id)
    assert mp4.response.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
    thumb = client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.response.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(thumb.content))
    assert image.format == "WEBP" and image.size == (48, 32)
    sheet = client.videos.download_content(video.id, variant="spritesheet")
    assert sheet.response.headers["content-type"] == "image/jpeg"
    grid = Image.open(io.BytesIO(sheet.content))
    assert grid.format == "JPEG" and grid.size == (3 * 48, 3 * 32)     # all 9 frames, 3 by 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.download_content(video.id, variant="poster")   # type: ignore[arg-type]
    assert caught.value.param == "variant"


def test_content_answers_head_and_range(client, mesh):
    video = small_video(client)
    url = f"{mesh.http_url}/v1/videos/{video.id}/content"
    whole = httpx.get(url)
    size = len(whole.content)
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["accept-ranges"] == "bytes" and int(head.headers["content-length"]) == size
    part = httpx.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes 0-99/{size}"
    assert part.content == whole.content[:100]
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    beyond = httpx.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["error"]["param"] == "range"


def test_list_pages_with_limit_after_and_order(client_a):
    ids = [small_video(client_a, prompt=f"page {i}").id for i in range(3)]     # oldest first
    first = client_a.videos.list(limit=1)
    assert [v.id for v in first.data] == [ids[-1]] and first.has_more and first.last_id == ids[-1]
    second = client_a.videos.list(limit=1, after=first.last_id)
    assert [v.id for v in second.data] == [ids[-2]]
    ascending = client_a.videos.list(order="asc", limit=100)
    newest_first = client_a.videos.list(order="desc", limit=100)
    assert [v.id for v in ascending.data] == [v.id for v in newest_first.data][::-1]
    everything = [v.id for v in client_a.videos.list(limit=2)]      # the SDK follows has_more / last_id
    assert len(everything) == len(set(everything)) and set(ids) <= set(everything)
    assert everything == [v.id for v in newest_first.data]


def test_list_and_retrieve_show_only_the_callers_own_videos(client_a, client_b):
    mine = small_video(client_b, prompt="b's own")
    assert mine.id in [v.id for v in client_b.videos.list(limit=100)]
    assert mine.id not in [v.id for v in client_a.videos.list(limit=100)]
    with pytest.raises(openai.NotFoundError):
        client_a.videos.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        client_a.videos.delete(mine.id)
    assert client_b.videos.retrieve(mine.id).status == "completed"


def test_delete_removes_the_job_and_frees_its_files(client_a, gateway):
    video = small_video(client_a)
    client_a.videos.download_content(video.id, variant="thumbnail")     # a derived file too
    files = gateway.data_dir / "outputs" / video.id
    assert {path.suffix for path in files.iterdir()} == {".mp4", ".webp"}
    deleted = client_a.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    assert not files.exists()
    with pytest.raises(openai.NotFoundError):
        client_a.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client_a.videos.download_content(video.id)
    assert video.id not in [v.id for v in client_a.videos.list(limit=100)]


def test_deleting_a_running_video_cancels_it_first(client, mesh):
    video = client.videos.create(prompt="slow", size="64x64", extra_body={"num_frames": 17, "num_inference_steps": 200},
                                 extra_headers={"x-request-id": "sdk-delete-running"})
    deadline = time.monotonic() + 60
    while client.videos.retrieve(video.id).progress <= 5:       # past encoding (5 %): denoising
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    # The denoiser was told to stop, rather than running 200 steps for nobody.
    while not any("service=denoiser" in line and "request_id=sdk-delete-running" in line and "cancel" in line
                  for line in list(mesh.log)):
        assert time.monotonic() < deadline, "the denoiser never saw the cancellation"
        time.sleep(0.2)


# -- models and aliases -------------------------------------------------------------------------------------------

def test_models_list_and_retrieve(client, mesh):
    assert [m.id for m in client.models.list()] == [mesh.model]
    model = client.models.retrieve(mesh.model)
    assert model.id == mesh.model and model.object == "model" and model.owned_by == "diffmesh"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_aliases_are_listed_and_accepted_wherever_a_model_is(client_a, gateway, mesh):
    assert [m.id for m in client_a.models.list()] == [mesh.model, *ALIASES]
    alias = client_a.models.retrieve(ALIASES[0])
    assert alias.id == ALIASES[0] and alias.model_extra["root"] == mesh.model
    # Responses carry the model's id, whichever of its names the request used.
    video = small_video(client_a, model=ALIASES[1])
    assert video.status == "completed" and video.model == mesh.model
    image = client_a.images.generate(model=ALIASES[0], prompt="x", size="32x32", extra_body=FAST)
    assert decode(image.data[0].b64_json)[1].size == (32, 32)
    # gRPC: the same names.
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        auth = (("authorization", f"Bearer {KEY_A}"),)
        listed = stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth, timeout=30)
        assert [m.id for m in listed.models] == [mesh.model, *ALIASES]
        events = list(stub.Generate(gateway_pb2.GenerateRequest(prompt="x", model=ALIASES[1], width=32, height=32,
                                                                num_inference_steps=1), metadata=auth, timeout=60))
        assert events[-1].WhichOneof("item") == "completed"
        job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=events[0].accepted.job_id), metadata=auth, timeout=30)
        assert job.model == mesh.model


# -- errors -------------------------------------------------------------------------------------------------------

def openai_error(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors_are_in_openais_shape_on_every_route(client, mesh):
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/no/such/route", cast_to=object)
    assert caught.value.code == "unknown_url"
    with pytest.raises(openai.APIStatusError) as caught:
        client.post("/models", cast_to=object, body={})
    assert caught.value.status_code == 405
    reply = httpx.delete(f"{mesh.http_url}/v1/models")
    assert reply.status_code == 405 and "GET" in reply.headers["allow"]
    assert openai_error(reply)["code"] == "method_not_allowed"
    assert openai_error(httpx.get(f"{mesh.http_url}/nope"))["message"] == "Invalid URL (GET /nope)"
    assert openai_error(httpx.get(f"{mesh.http_url}/v1/videos/video_nope"))["type"] == "not_found_error"
    assert openai_error(httpx.get(f"{mesh.http_url}/v1/videos", params={"limit": 0}))["param"] == "limit"
    assert openai_error(httpx.get(f"{mesh.http_url}/v1/videos", params={"page": 2}))["param"] == "page"


def test_a_body_over_the_limit_is_413_in_openais_shape(client_a, gateway):
    with pytest.raises(openai.APIStatusError) as caught:
        client_a.videos.create(prompt="x", input_reference=("big.png", b"\0" * (2 * MAX_BODY), "image/png"))
    assert caught.value.status_code == 413 and caught.value.param == "body"
    reply = httpx.post(f"{gateway.http_url}/v1/images/generations", content=b"{" * (2 * MAX_BODY),
                       headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/json"})
    assert reply.status_code == 413 and openai_error(reply)["param"] == "body"


def test_a_missing_key_is_401_in_openais_shape(gateway):
    reply = httpx.get(f"{gateway.http_url}/v1/models")
    assert reply.status_code == 401 and openai_error(reply)["type"] == "authentication_error"
    with sdk(gateway.http_url, "wrong-key") as wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()
