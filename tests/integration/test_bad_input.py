"""Bad input gets a clear error naming the field, over gRPC and HTTP, and the gateway keeps serving."""

from __future__ import annotations

import time

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
    ("fps-huge", dict(fps=2**31 - 1), None, "INVALID_ARGUMENT", "fps"),
    # Seeds are 32-bit (the families' CPU generator keeps only the low 32 bits): wider ones are refused.
    ("seed-over-32-bits", dict(seed=2**32), {"seed": 2**32}, "INVALID_ARGUMENT", "seed"),
    ("seed-over-64-bits", None, {"seed": 2**70}, "INVALID_ARGUMENT", "seed"),
    ("seed-negative", dict(seed=-1), {"seed": -1}, "INVALID_ARGUMENT", "seed"),
    ("n-huge", dict(n=2**31 - 1), {"n": 10**30}, "INVALID_ARGUMENT", "n"),
    ("steps-huge", dict(num_inference_steps=2**31 - 1), {"num_inference_steps": 10**30}, "INVALID_ARGUMENT",
     "num_inference_steps"),
    ("width-huge", dict(width=2**31 - 1), {"size": "99999999999999999999x32"}, "INVALID_ARGUMENT", "width"),
    ("request-id-with-newline", dict(request_id="a\nb"), None, "INVALID_ARGUMENT", "request_id"),
    ("request-id-over-128", dict(request_id="r" * 129), None, "INVALID_ARGUMENT", "request_id"),
]
# REST names the image size "size" (WIDTHxHEIGHT), where gRPC has width and height.
REST_PARAM = {"width": "size", "height": "size"}
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404}


def base_request(**fields) -> gateway_pb2.GenerateRequest:
    values = dict(prompt="a cat", width=32, height=32, num_inference_steps=1)
    values.update(fields)
    return gateway_pb2.GenerateRequest(**values)


@pytest.mark.parametrize("fields,code,named", [(f, c, n) for _, f, _, c, n in BAD if f is not None],
                         ids=[b[0] for b in BAD if b[1] is not None])
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
    ({"fps": 10**400, "seconds": 1}, "fps"),           # checked before it scales seconds (no float overflow)
    ({"seconds": "1e999"}, "seconds"),
    ({"seed": 2**32}, "seed"),
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


# --- Text no protobuf message can carry, messages that do not parse, request ids ------------------------------


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/videos"])
@pytest.mark.parametrize("body,named", [(b'{"prompt": "a \\ud800 cat"}', "prompt"),
                                        (b'{"prompt": "a cat", "negative_prompt": "x\\udc00"}', "negative_prompt")],
                         ids=["prompt", "negative_prompt"])
def test_http_lone_surrogate_is_400_naming_the_field(mesh, path, body, named):
    # JSON may spell a lone surrogate ("\ud800"); Python keeps it in a str, but no UTF-8 message can carry it.
    reply = httpx.post(mesh.http_url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == named and "surrogate" in reply.json()["error"]["message"]


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (a string or a message) as wire bytes."""
    return bytes([number << 3 | 2, len(payload)]) + payload


NOT_UTF8 = b"\xff\xfe"
GARBAGE = b"\xff\xff\xff\xff"
# (server, method, request bytes, client-streaming, field named): a string field holding invalid UTF-8 (nested where
# the field is inside params or a tensor chunk), or bytes that are no message at all, on every server.
UNDECODABLE = [
    ("gateway", "/diffmesh.v1.Gateway/Generate", field_bytes(2, NOT_UTF8), False, "prompt"),
    ("gateway", "/diffmesh.v1.Gateway/GetJob", field_bytes(1, NOT_UTF8), False, "job_id"),
    ("gateway", "/diffmesh.v1.Gateway/Generate", GARBAGE, False, "request"),
    ("encoder", "/diffmesh.v1.Encoder/Encode", field_bytes(1, NOT_UTF8), False, "request_id"),
    ("encoder", "/grpc.health.v1.Health/Check", field_bytes(1, NOT_UTF8), False, "service"),
    ("denoiser", "/diffmesh.v1.Denoiser/Denoise", field_bytes(1, field_bytes(1, NOT_UTF8)), True,
     "params.request_id"),
    ("denoiser", "/diffmesh.v1.Denoiser/Denoise", field_bytes(2, field_bytes(1, NOT_UTF8)), True, "tensor.name"),
    ("denoiser", "/diffmesh.v1.Denoiser/Describe", GARBAGE, False, "request"),
    ("decoder", "/diffmesh.v1.Decoder/Decode", GARBAGE, True, "request"),
    ("decoder", "/diffmesh.v1.Decoder/EncodeImage", field_bytes(1, NOT_UTF8), False, "request_id"),
    ("decoder", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", field_bytes(1, NOT_UTF8), True,
     "host"),
]


def raw_call(address: str, method: str, payload: bytes, streaming: bool, metadata=()) -> None:
    """Call `method` with raw request bytes (no client-side serialization), reading every response."""
    identity = lambda data: data    # noqa: E731
    with grpc.insecure_channel(address) as channel:
        if streaming:
            call = channel.stream_stream(method, request_serializer=identity, response_deserializer=identity)
            list(call(iter([payload]), timeout=10, metadata=metadata))
        else:
            call = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
            list(call(payload, timeout=10, metadata=metadata))


@pytest.mark.parametrize("server,method,payload,streaming,named", UNDECODABLE,
                         ids=[f"{u[0]}-{u[1].rsplit('/', 1)[1]}-{u[4]}" for u in UNDECODABLE])
def test_undecodable_message_is_invalid_argument_naming_the_field(mesh, server, method, payload, streaming, named):
    address = mesh.grpc_address if server == "gateway" else mesh.stages[server]
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(address, method, payload, streaming)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert raised.value.details().startswith(f"{named}: ") and "DecodeError" not in raised.value.details()
    status = rpc_status.from_call(raised.value)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == [named]


BAD_ID = "evil id marker-7d1e"


@pytest.mark.parametrize("server", ["gateway", "encoder", "denoiser", "decoder"])
def test_bad_request_id_metadata_is_invalid_argument_and_never_logged(mesh, server):
    address = mesh.grpc_address if server == "gateway" else mesh.stages[server]
    method = {"gateway": "/diffmesh.v1.Gateway/GetJob", "encoder": "/diffmesh.v1.Encoder/Encode",
              "denoiser": "/diffmesh.v1.Denoiser/Describe", "decoder": "/diffmesh.v1.Decoder/EncodeImage"}[server]
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(address, method, b"", False, metadata=(("x-request-id", BAD_ID),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("x-request-id: ")
    assert not any("marker-7d1e" in line for line in mesh.log)


@pytest.mark.parametrize("value", [b"h\xc3\xa9llo", b"a b", b"r" * 129, b"evil\tid marker-7d1e"],
                         ids=["non-ascii", "space", "over-128", "tab"])
def test_http_bad_x_request_id_is_400_naming_it(mesh, value):
    reply = httpx.post(f"{mesh.http_url}/v1/images/generations", json={"prompt": "a cat", "size": "32x32"},
                       headers={"x-request-id": value}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "x-request-id"
    assert not any("marker-7d1e" in line for line in mesh.log)


def test_good_request_id_is_kept_and_a_drawn_seed_is_32_bit(mesh):
    reply = httpx.post(f"{mesh.http_url}/v1/images/generations", timeout=60,
                       json={"prompt": "a cat", "size": "32x32", "num_inference_steps": 1},
                       headers={"x-request-id": "client-42.a:b_c"})
    assert reply.status_code == 200, reply.text
    assert 0 <= reply.json()["seed"] <= 2**32 - 1
    deadline = time.monotonic() + 5          # the services' output reaches mesh.log through a pipe
    while not any("request_id=client-42.a:b_c" in line for line in mesh.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("request_id=client-42.a:b_c" in line for line in mesh.log)


def test_stage_refuses_a_seed_wider_than_32_bits(mesh):
    from diffmesh.v1 import denoiser_pb2

    params = denoiser_pb2.DenoiseParams(model=mesh.model, width=32, height=32, num_frames=1, num_inference_steps=1,
                                        seed=2**32 + 7)
    payload = denoiser_pb2.DenoiseRequest(params=params).SerializeToString()
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(mesh.stages["denoiser"], "/diffmesh.v1.Denoiser/Denoise", payload, True)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith("seed: ")


@pytest.mark.parametrize("path", ["/v1/videos/..", "/v1/videos/..%2F..%2Fetc%2Fpasswd", "/v1/videos/%00",
                                  "/v1/videos/%2e%2e%2fjobs", "/v1/videos/a%20b/content", "/v1/videos/%C3%A9",
                                  "/v1/videos/" + "x" * 4000, "/v1/images/..%2F..%2Fjobs/0",
                                  "/v1/images/video_x/0", "/v1/videos/video_..%5C..%5Cx"])
def test_weird_job_ids_are_404(mesh, path):
    for method in ("GET", "DELETE"):
        reply = httpx.request(method, mesh.http_url + path, timeout=10)
        assert reply.status_code in (404, 405), (method, path, reply.status_code, reply.text)
        assert "error" in reply.json()
