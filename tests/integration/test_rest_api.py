"""The OpenAI-style REST shim, driven over real HTTP against the running mesh."""

from __future__ import annotations

import base64
import io
import time

import httpx
import imageio_ffmpeg
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def http(mesh):
    with httpx.Client(base_url=mesh.http_url, timeout=120) as client:
        yield client


def wait_for(http, video_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/videos/{video_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"video {video_id} did not finish: {job}")


def test_health_is_ok_when_every_stage_serves(http):
    reply = http.get("/health")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok"
    assert reply.json()["stages"] == {"encoder": True, "denoiser": True, "decoder": True}


def test_models_lists_the_served_model(http, mesh):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [mesh.model]


def test_images_b64_json_returns_n_pngs_of_the_requested_size(http):
    reply = http.post("/v1/images/generations", json={
        "prompt": "a lighthouse at dusk", "n": 2, "size": "64x48", "seed": 3, "num_inference_steps": 2})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert len(data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in data]
    assert all(image.format == "PNG" and image.size == (64, 48) for image in images)
    assert images[0].tobytes() != images[1].tobytes()  # two draws from one seed differ


def test_images_same_seed_gives_same_image(http):
    body = {"prompt": "a cat", "size": "32x32", "seed": 9, "num_inference_steps": 2}
    first = http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    second = http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    assert first == second


def test_images_url_format_serves_the_png(http):
    reply = http.post("/v1/images/generations", json={
        "prompt": "a cat", "size": "32x32", "response_format": "url", "num_inference_steps": 2})
    assert reply.status_code == 200, reply.text
    url = reply.json()["data"][0]["url"]
    image = http.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)


def test_video_job_completes_with_a_playable_mp4_of_the_requested_frames(http, tmp_path):
    reply = http.post("/v1/videos", json={"prompt": "waves on a beach", "size": "48x32", "num_frames": 9,
                                          "num_inference_steps": 2, "seed": 1})
    assert reply.status_code == 200, reply.text
    job = reply.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["size"] == "48x32"
    done = wait_for(http, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    content = http.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    path = tmp_path / "video.mp4"
    path.write_bytes(content.content)
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert frames == 9


def test_video_seconds_become_4k_plus_1_frames(http):
    job = http.post("/v1/videos", json={"prompt": "rain", "size": "32x32", "seconds": "1", "fps": 8,
                                        "num_inference_steps": 1}).json()
    assert job["num_frames"] == 9
    assert wait_for(http, job["id"])["status"] == "completed"


def test_an_unknown_field_is_400_naming_it_not_ignored(http):
    for path in ("/v1/images/generations", "/v1/videos"):
        reply = http.post(path, json={"prompt": "a cat", "size": "32x32", "sampler": "euler"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "sampler"


def test_unknown_video_is_404(http):
    for path in ("/v1/videos/video_nope", "/v1/videos/video_nope/content"):
        reply = http.get(path)
        assert reply.status_code == 404
        assert "video_nope" in reply.json()["error"]["message"]


def test_cancelled_video_reports_failed_with_cancelled_code(http):
    # POST .../cancel stops a job and keeps it; DELETE (OpenAI's) removes it (tests/integration/test_openai_sdk.py).
    job = http.post("/v1/videos", json={"prompt": "slow", "size": "256x256", "num_frames": 33,
                                        "num_inference_steps": 200}).json()
    cancelled = http.post(f"/v1/videos/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["id"] == job["id"]
    done = wait_for(http, job["id"], timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "cancelled"
    assert http.get(f"/v1/videos/{job['id']}/content").status_code == 409
    # The mesh serves the next request normally.
    assert http.post("/v1/images/generations", json={"prompt": "ok", "size": "32x32",
                                                     "num_inference_steps": 1}).status_code == 200


def test_metrics_are_prometheus_text(http):
    http.get("/health")
    reply = http.get("/metrics")
    assert reply.status_code == 200
    assert 'diffmesh_http_requests_total{route="/health",status="200"}' in reply.text
    assert "diffmesh_active_jobs" in reply.text


def test_client_hanging_up_on_an_image_request_cancels_it(mesh):
    body = {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{mesh.http_url}/v1/images/generations", json=body, timeout=2.0,
                   headers={"x-request-id": "rest-hangup-1"})
    # The denoiser is told to stop, rather than running 200 steps for nobody.
    deadline = time.monotonic() + 30
    while not any("service=denoiser" in line and "request_id=rest-hangup-1" in line and "cancel" in line
                  for line in list(mesh.log)):
        assert time.monotonic() < deadline, "the denoiser never saw the cancellation"
        time.sleep(0.2)
