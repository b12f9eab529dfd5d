"""The OpenAI-compatibility pieces that need no stages: model aliases, the jobs' paged list and delete, the media
the REST API derives (image formats, thumbnails, spritesheets), Range answers, and error shapes with Retry-After.
tests/integration/test_openai_sdk.py drives the same through the real SDK and the real mesh."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import pathlib

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Route

from services.common.errors import NotFound, ResourceExhausted, Unavailable
from services.gateway import media_assets, rest
from services.gateway.config import GatewayConfig, ModelStages
from services.gateway.jobs import JobStatus, new_job_id
from services.gateway.rest_files import RangedFileResponse
from services.gateway.server import build_service
from services.gateway.store import JobDatabase
from tests.unit.test_job_store import DONE, REQUEST, ScriptedPipeline, make_store, wait_for

UNREACHABLE = ("127.0.0.1:9",)


@pytest.fixture
def loop():
    """A current event loop for building a gateway (its stage channels ask for one), as at start-up."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def service_for(tmp_path: pathlib.Path, *models: ModelStages):
    return build_service(GatewayConfig(models=models, data_dir=str(tmp_path)))


def stages(name: str, *aliases: str) -> ModelStages:
    return ModelStages(name, encoder=UNREACHABLE, denoiser=UNREACHABLE, decoder=UNREACHABLE, aliases=aliases)


# -- aliases ------------------------------------------------------------------------------------------------------

def test_every_alias_resolves_to_its_models_id_and_unknown_names_are_not_found(tmp_path, loop):
    service = service_for(tmp_path, stages("wan", "wan-a", "wan-b"), stages("flux", "flux-a"))
    assert list(service.served_names) == ["wan", "wan-a", "wan-b", "flux", "flux-a"]
    assert [service.model_id(name) for name in ("", "wan", "wan-b", "flux-a")] == ["wan", "wan", "wan", "flux"]
    assert service.models == ["wan", "flux"]          # the ids: jobs and stages know only these
    with pytest.raises(NotFound) as caught:
        service.model_id("sora-2")
    assert "'sora-2'" in caught.value.message and "wan-b" in caught.value.message


# -- the job database's pages -------------------------------------------------------------------------------------

def test_pages_follow_creation_order_per_owner_and_prefix(tmp_path):
    db = JobDatabase(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    for i, (job_id, owner) in enumerate([("video_a1", "a"), ("img_a", "a"), ("video_b1", "b"), ("video_a2", "a"),
                                         ("video_a3", "a"), ("videoXa", "a")]):
        db.insert(job_id, dataclasses.replace(REQUEST, owner=owner), created_at=100.0 + (i if i != 4 else 3),
                  lease_owner="x", lease_expires=0.0)
    # video_a2 and video_a3 share a created_at: the id breaks the tie, the same way in both directions.
    rows, more = db.page(owner="a", id_prefix="video_", after=None, limit=2, descending=True)
    assert [r.id for r in rows] == ["video_a3", "video_a2"] and more
    rows, more = db.page(owner="a", id_prefix="video_", after="video_a2", limit=2, descending=True)
    assert [r.id for r in rows] == ["video_a1"] and not more
    rows, more = db.page(owner="a", id_prefix="video_", after=None, limit=10, descending=False)
    assert [r.id for r in rows] == ["video_a1", "video_a2", "video_a3"] and not more      # "_" is no wildcard
    assert db.page(owner="a", id_prefix="video_", after="video_b1", limit=2, descending=True) is None
    assert db.page(owner="b", id_prefix="video_", after=None, limit=5, descending=True)[0][0].id == "video_b1"
    db.close()


def test_delete_cancels_a_running_job_then_removes_its_rows_and_files(tmp_path):
    async def scenario():
        pipeline = ScriptedPipeline(["hang", *DONE])
        store = make_store(tmp_path, pipeline)
        await store.start()
        running = await store.submit(REQUEST, new_job_id("video"), stream=False)
        await wait_for(store, running.id, JobStatus.IN_PROGRESS)
        await store.delete(running.id)
        pipeline.release.set()
        done = await store.submit(REQUEST, new_job_id("video"), stream=False)
        await wait_for(store, done.id, JobStatus.COMPLETED)
        had_files = (tmp_path / "outputs" / done.id / "0.mp4").is_file()
        await store.delete(done.id)
        page, more = await store.page("", "video_")
        missing = []
        for job_id in (running.id, done.id):
            with pytest.raises(NotFound):
                await store.get(job_id)
            missing.append(job_id)
        with pytest.raises(NotFound):
            await store.delete(done.id)
        await store.shutdown(1.0)
        return had_files, page, more, missing

    had_files, page, more, missing = asyncio.run(scenario())
    assert had_files and not any((tmp_path / "outputs" / job_id).exists() for job_id in missing)
    assert page == [] and not more


# -- derived media ------------------------------------------------------------------------------------------------

def png_of(width: int, height: int) -> bytes:
    pixels = (np.arange(width * height * 3, dtype=np.uint32).reshape(height, width, 3) * 7 % 256).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("output_format,pil_format,mime_type", [
    ("png", "PNG", "image/png"), ("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")])
def test_images_are_encoded_in_the_format_asked(output_format, pil_format, mime_type):
    data, mime = media_assets.encode_image(png_of(40, 24), output_format, 80)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size, mime) == (pil_format, (40, 24), mime_type)


def test_lower_compression_values_make_smaller_jpegs():
    png = png_of(96, 96)
    assert len(media_assets.encode_image(png, "jpeg", 10)[0]) < len(media_assets.encode_image(png, "jpeg", 95)[0])


def write_mp4(path: pathlib.Path, frames: int, width: int = 48, height: int = 32) -> pathlib.Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), i * 255 // max(frames - 1, 1), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_thumbnail_is_the_first_frame_as_webp(tmp_path):
    image = Image.open(io.BytesIO(media_assets.thumbnail(write_mp4(tmp_path / "v.mp4", 5))))
    assert image.format == "WEBP" and image.size == (48, 32)
    assert max(image.convert("L").getextrema()) < 40          # frame 0 is the dark one


def test_spritesheet_spreads_up_to_16_frames_over_a_near_square_grid(tmp_path):
    sheet = Image.open(io.BytesIO(media_assets.spritesheet(write_mp4(tmp_path / "v.mp4", 33))))
    assert sheet.format == "JPEG" and sheet.size == (4 * 48, 4 * 32)
    first, last = sheet.crop((0, 0, 48, 32)).convert("L"), sheet.crop((3 * 48, 3 * 32, 4 * 48, 4 * 32)).convert("L")
    assert np.asarray(first).mean() < 40 and np.asarray(last).mean() > 215     # from the first to the last frame
    small = Image.open(io.BytesIO(media_assets.spritesheet(write_mp4(tmp_path / "w.mp4", 5))))
    assert small.size == (3 * 48, 2 * 32)                     # 5 frames: 3 columns, 2 rows


# -- HTTP ---------------------------------------------------------------------------------------------------------

def test_ranges_are_served_and_an_unsatisfiable_one_is_416_in_openais_shape(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 4)
    app = Starlette(routes=[Route("/f", lambda request: RangedFileResponse(path, media_type="video/mp4"),
                                  methods=["GET", "HEAD"])])
    with TestClient(app) as client:
        part = client.get("/f", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == bytes(range(10, 20))
        assert part.headers["content-range"] == "bytes 10-19/1024"
        beyond = client.get("/f", headers={"Range": "bytes=2000-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == "bytes */1024"
        assert beyond.json()["error"] == {"message": "the Range asked for is outside the file",
                                          "type": "invalid_request_error", "param": "range",
                                          "code": "range_not_satisfiable"}
        malformed = client.get("/f", headers={"Range": "bytes=z"})
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "range"
        head = client.head("/f")
        assert head.status_code == 200 and head.content == b"" and head.headers["accept-ranges"] == "bytes"


def test_429_and_503_carry_retry_after():
    full = rest.mesh_error_response(ResourceExhausted("queue full", retry_after_s=2.2))
    assert full.status_code == 429 and full.headers["retry-after"] == "3"
    down = rest.mesh_error_response(Unavailable("denoiser", "no replica is serving"))
    assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1


def test_unknown_routes_methods_and_fields_answer_in_openais_shape(tmp_path, loop):
    with TestClient(rest.create_app(service_for(tmp_path, stages("wan")))) as client:
        unknown = client.get("/v1/nope")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
        wrong = client.put("/v1/models")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}
        for body, param in [({"prompt": "x", "quality": "hd"}, "quality"), ({"prompt": "x", "colour": 1}, "colour"),
                            ({"prompt": "x", "output_format": "jpeg", "output_compression": 101},
                             "output_compression")]:
            refused = client.post("/v1/images/generations", json=body)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param
        form = client.post("/v1/videos", data={"prompt": "x", "input_reference[file_id]": "file-1"})
        assert form.status_code == 400 and form.json()["error"]["param"] == "input_reference.file_id"
        listing = client.get("/v1/videos", params={"order": "sideways"})
        assert listing.status_code == 400 and listing.json()["error"]["param"] == "order"
