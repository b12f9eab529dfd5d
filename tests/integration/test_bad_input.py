"""Bad input gets a clear error naming the field, over gRPC and HTTP, and the gateway keeps serving."""

from __future__ import annotations

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from diffmesh.v1 import gateway_pb2

# (case id, GenerateRequest fields, REST body overrides, expected gRPC code, field named in the message)
BAD = [
    ("size-not-multiple-of-16", dict(width=100, height=64), {"size": "100x64"}, "INVALID_ARGUMENT", "width"),
    ("size-too-large", dict(width=8192, height=64), {"size": "8192x64"}, "INVALID_ARGUMENT", "width"),
    ("output-pixels-over-limit", dict(width=2048, height=2048, num_frames=41), None, "INVALID_ARGUMENT", "size"),
    ("frames-not-4k+1", dict(num_frames=6), None, "INVALID_ARGUMENT", "num_frames"),
    ("steps-zero", dict(num_inference_steps=-1), {"num_inference_steps": -1}, "INVALID_ARGUMENT",
     "num_inference_steps"),
    ("steps-over-200", dict(num_inference_steps=201), {"num_inference_steps": 201}, "INVALID_ARGUMENT",
     "num_inference_steps"),
    ("guidance-negative", dict(guidance_scale=-1.0), {"guidance_scale": -1.0}, "INVALID_ARGUMENT",
     "guidance_scale"),
    ("guidance-nan", dict(guidance_scale=float("nan")), None, "INVALID_ARGUMENT", "guidance_scale"),
    ("guidance-inf", dict(guidance_scale=float("inf")), None, "INVALID_ARGUMENT", "guidance_scale"),
    ("prompt-empty", dict(prompt=""), {"prompt": ""}, "INVALID_ARGUMENT", "prompt"),
    ("prompt-blank", dict(prompt="   "), {"prompt": "   "}, "INVALID_ARGUMENT", "prompt"),
    ("prompt-over-long", dict(prompt="x" * 9000), {"prompt": "x" * 9000}, "INVALID_ARGUMENT", "prompt"),
    ("n-over-10", dict(n=11), {"n": 11}, "INVALID_ARGUMENT", "n"),
    ("n-negative", dict(n=-1), {"n": -1}, "INVALID_ARGUMENT", "n"),
    ("unknown-model", dict(model="no-such-model"), {"model": "no-such-model"}, "NOT_FOUND", "no-such-model"),
    # An explicit 0 is checked as given, never silently replaced by the default.
    ("width-zero", dict(width=0), {"size": "0x32"}, "INVALID_ARGUMENT", "width"),
    ("height-zero", dict(height=0), {"size": "32x0"}, "INVALID_ARGUMENT", "height"),
    ("frames-zero", dict(num_frames=0), None, "INVALID_ARGUMENT", "num_frames"),
    ("steps-zero-explicit", dict(num_inference_steps=0), {"num_inference_steps": 0}, "INVALID_ARGUMENT",
     "num_inference_steps"),
    ("n-zero", dict(n=0), {"n": 0}, "INVALID_ARGUMENT", "n"),
    ("fps-zero", dict(fps=0), None, "INVALID_ARGUMENT", "fps"),
]
# REST names the image size "size" (WIDTHxHEIGHT), where gRPC has width and height.
REST_PARAM = {"width": "size", "height": "size"}
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404}


def base_request(**fields) -> gateway_pb2.GenerateRequest:
    values = dict(prompt="a cat", width=32, height=32, num_inference_steps=1)
    values.update(fields)
    return gateway_pb2.GenerateRequest(**values)


@pytest.mark.parametrize("fields,code,named", [(f, c, n) for _, f, _, c, n in BAD], ids=[b[0] for b in BAD])
def test_grpc_bad_request_is_rejected_naming_the_field(mesh, fields, code, named):
    stub = mesh.gateway_stub()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(base_request(**fields), timeout=30))
    assert raised.value.code().name == code
    assert named in raised.value.details()
    assert "Traceback" not in raised.value.details()
    if code == "INVALID_ARGUMENT":
        # The field also travels as data: a google.rpc.BadRequest field violation in the status details.
        status = rpc_status.from_call(raised.value)
        assert status is not None and len(status.details) == 1
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == [named]


@pytest.mark.parametrize("body,code,named", [(b, c, n) for _, _, b, c, n in BAD if b is not None],
                         ids=[b[0] for b in BAD if b[2] is not None])
def test_http_bad_request_is_rejected_naming_the_field(mesh, body, code, named):
    payload = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 1, **body}
    reply = httpx.post(f"{mesh.http_url}/v1/images/generations", json=payload, timeout=30)
    assert reply.status_code == HTTP_STATUS[code], reply.text
    error = reply.json()["error"]
    assert REST_PARAM.get(named, named) in error["message"] and "Traceback" not in reply.text
    if code == "INVALID_ARGUMENT":
        assert error["param"] == REST_PARAM.get(named, named)


@pytest.mark.parametrize("body,named", [
    ({"prompt": "a cat", "size": "big"}, "size"),
    ({"prompt": "a cat", "n": "two"}, "n"),
    ({"size": "32x32"}, "prompt"),
    ({"prompt": "a cat", "response_format": "gif"}, "response_format"),
])
def test_http_malformed_body_is_400_naming_the_field(mesh, body, named):
    reply = httpx.post(f"{mesh.http_url}/v1/images/generations", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == named


@pytest.mark.parametrize("body,named", [
    ({"num_frames": 10}, "num_frames"),
    ({"num_frames": 0}, "num_frames"),
    ({"size": "0x0"}, "size"),
    ({"fps": 0}, "fps"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
])
def test_http_video_explicit_bad_value_is_400_naming_it(mesh, body, named):
    reply = httpx.post(f"{mesh.http_url}/v1/videos", json={"prompt": "a", **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == named and named in reply.json()["error"]["message"]


def test_unknown_job_is_not_found_over_grpc(mesh):
    stub = mesh.gateway_stub()
    for call in (stub.GetJob, stub.CancelJob):
        with pytest.raises(grpc.RpcError) as raised:
            call(gateway_pb2.GetJobRequest(job_id="gen_missing") if call is stub.GetJob
                 else gateway_pb2.CancelJobRequest(job_id="gen_missing"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "gen_missing" in raised.value.details()


def test_gateway_keeps_serving_after_bad_requests(mesh):
    stub = mesh.gateway_stub()
    for _, fields, _, _, _ in BAD[:4]:
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(base_request(**fields), timeout=30))
    events = list(stub.Generate(base_request(seed=1), timeout=120))
    kinds = [event.WhichOneof("item") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "completed" and "media" in kinds
    assert httpx.get(f"{mesh.http_url}/health", timeout=10).json()["status"] == "ok"
