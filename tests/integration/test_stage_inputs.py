"""The stages (called directly, as any client on their network can) answer every input with a status that names
what is wrong, never INTERNAL / UNKNOWN, never a hang, and keep serving; a refused stream leaves no memory behind.

The fuzzing half drives the shared mesh's real stage servers with hypothesis: params of every field and range,
tensor chunks of any dtype, shape, byte count, name and order, and request-id metadata, starting from what the real
encoder and denoiser send (so some cases go deep: a valid stream with one thing wrong), every call with a deadline.
"""

from __future__ import annotations

import math
import pathlib
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from diffmesh.v1 import decoder_pb2, denoiser_pb2, encoder_pb2, tensor_pb2
from services.common.tensors import DTYPES, MAX_TENSOR_BYTES

CALL_TIMEOUT_S = 10.0
# Codes a stage must never answer with: a bug (INTERNAL, UNKNOWN) or a hang (our own deadline passing).
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=False, print_blob=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large])
MIB = 1 << 20


def stage_pid(mesh, stage: str) -> int:
    """The pid of the stage server `diffmesh up` started (forked by its forkserver, running services.<stage>.server)."""
    from tests.integration.test_durable_jobs import descendants

    for child in descendants(mesh.process.pid):
        if f"services.{stage}.server" in pathlib.Path(f"/proc/{child}/cmdline").read_bytes().decode():
            return child
    raise AssertionError(f"no {stage} process under diffmesh up ({mesh.process.pid})")


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def channels(mesh):
    opened = {stage: grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 16 * MIB)])
              for stage, address in mesh.stages.items()}
    yield opened
    for channel in opened.values():
        channel.close()


def denoise_call(channels):
    return channels["denoiser"].stream_stream(
        "/diffmesh.v1.Denoiser/Denoise", request_serializer=denoiser_pb2.DenoiseRequest.SerializeToString,
        response_deserializer=denoiser_pb2.DenoiseEvent.FromString)


def params(mesh, **fields) -> denoiser_pb2.DenoiseParams:
    values = dict(model=mesh.model, width=32, height=32, num_frames=1, num_inference_steps=1, guidance_scale=5.0,
                  seed=3)
    return denoiser_pb2.DenoiseParams(**{**values, **fields})


def declared_stream(mesh, declared_bytes: int, sent_chunks: int, sent: list[int]):
    """Params, then one tensor that declares `declared_bytes` and sends `sent_chunks` MiB of it (never all)."""
    yield denoiser_pb2.DenoiseRequest(params=params(mesh))
    piece = bytes(MIB)
    for i in range(sent_chunks):
        header = dict(dtype="uint8", shape=[declared_bytes]) if i == 0 else {}
        sent.append(i)
        yield denoiser_pb2.DenoiseRequest(tensor=tensor_pb2.TensorChunk(name="prompt_embeds", data=piece, **header))


def test_a_tensor_declared_over_the_limit_is_refused_at_its_first_chunk(mesh, channels):
    sent: list[int] = []
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(denoise_call(channels)(declared_stream(mesh, 2 << 30, 256, sent), timeout=CALL_TIMEOUT_S))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details()
    assert details.startswith("prompt_embeds.shape: ") and str(MAX_TENSOR_BYTES) in details
    # Refused on the declaration: the client had sent a fraction of the 256 MiB when the answer came.
    assert len(sent) < 128 and time.monotonic() - started < 5


def test_a_message_over_the_size_limit_is_resource_exhausted(mesh):
    # Only the client's own limit is raised: the stage's 16 MiB receive limit must answer.
    big = denoiser_pb2.DenoiseRequest(tensor=tensor_pb2.TensorChunk(name="prompt_embeds", data=bytes(17 * MIB)))
    with grpc.insecure_channel(mesh.stages["denoiser"], options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        call = ch.stream_stream("/diffmesh.v1.Denoiser/Denoise",
                                request_serializer=denoiser_pb2.DenoiseRequest.SerializeToString,
                                response_deserializer=denoiser_pb2.DenoiseEvent.FromString)
        with pytest.raises(grpc.RpcError) as raised:
            list(call(iter([denoiser_pb2.DenoiseRequest(params=params(mesh)), big]), timeout=CALL_TIMEOUT_S))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()


def test_a_refused_stream_leaves_the_stage_memory_where_it_was(mesh, channels):
    # Streams that declare most of the limit and stop short are refused at their end, after 96 MiB each arrived:
    # before, each left its bytes resident (458 -> 732 -> 991 -> 1248 MB for three of 256 MB).
    pid = stage_pid(mesh, "denoiser")
    before = rss_mb(pid)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as raised:
            list(denoise_call(channels)(declared_stream(mesh, MAX_TENSOR_BYTES - 1, 96, []), timeout=30))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended" in raised.value.details()
    after = rss_mb(pid)
    assert after - before < 48, f"denoiser RSS {before:.0f} -> {after:.0f} MB after three refused 96 MiB streams"


# --- fuzzing -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_streams(mesh, channels):
    """What the gateway really sends the denoiser (the encoder's chunks) and the decoder (the denoiser's latents)."""
    encode = channels["encoder"].unary_stream("/diffmesh.v1.Encoder/Encode",
                                             request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
                                             response_deserializer=tensor_pb2.TensorChunk.FromString)
    embeddings = list(encode(encoder_pb2.EncodeRequest(model=mesh.model, prompt="a cat", negative_prompt="dull",
                                                       guidance_scale=5.0), timeout=60))
    requests = [denoiser_pb2.DenoiseRequest(params=params(mesh))] + [
        denoiser_pb2.DenoiseRequest(tensor=chunk) for chunk in embeddings]
    latents = [event.tensor for event in denoise_call(channels)(iter(requests), timeout=60)
               if event.WhichOneof("item") == "tensor"]
    assert embeddings and latents
    return {"embeddings": embeddings, "latents": latents}


INT32 = st.one_of(st.sampled_from([0, 1, 5, 9, 16, 32, 48, -1, -16, 17, 2**31 - 1, -(2**31)]),
                  st.integers(-(2**31), 2**31 - 1))
SMALL = st.sampled_from([16, 32, 48, 0, -16, 17, 2**31 - 1])        # sizes that stay cheap when they are valid
DOUBLES = st.one_of(st.sampled_from([0.0, 1.0, 5.0, -1.0, math.nan, math.inf, -math.inf, 1e308]), st.floats())
TEXT = st.text(max_size=40)
# Mostly a good id or none (so the call goes on to its params), sometimes any printable text up to 140 characters.
METADATA = st.one_of(st.just(()), st.just((("x-request-id", "fuzz-1"),)), st.just((("x-request-id", "a" * 128),)),
                     st.tuples(st.tuples(st.just("x-request-id"),
                                         st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=140))))


@st.composite
def chunk(draw, names: list[str]) -> tensor_pb2.TensorChunk:
    shape = draw(st.lists(st.one_of(st.integers(-2, 64), st.sampled_from([2**31, 2**40, 2**62])), max_size=10))
    return tensor_pb2.TensorChunk(name=draw(st.sampled_from([*names, "", "evil"]) | TEXT),
                                  dtype=draw(st.sampled_from([*DTYPES, "", "float64", "int8"]) | TEXT),
                                  shape=shape, data=draw(st.binary(max_size=2048)), last=draw(st.booleans()))


@st.composite
def mutated(draw, chunks: list[tensor_pb2.TensorChunk], names: list[str]) -> list[tensor_pb2.TensorChunk]:
    """A real stream with things wrong: chunks dropped, repeated, swapped, cut, renamed, or foreign ones added."""
    out = [tensor_pb2.TensorChunk.FromString(c.SerializeToString()) for c in chunks]
    for _ in range(draw(st.integers(0, 3))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        action = draw(st.sampled_from(["drop", "repeat", "swap", "cut", "rename", "retype", "reshape", "insert"]))
        if action == "drop":
            out.pop(i)
        elif action == "repeat":
            out.insert(i, out[i])
        elif action == "swap":
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        elif action == "cut":
            out[i].data = out[i].data[: draw(st.integers(0, max(len(out[i].data) - 1, 0)))]
        elif action == "rename":
            out[i].name = draw(st.sampled_from(names) | TEXT)
        elif action == "retype":
            out[i].dtype = draw(st.sampled_from(list(DTYPES)))
        elif action == "reshape":
            del out[i].shape[:]
            out[i].shape.extend(draw(st.lists(st.integers(0, 8), max_size=5)))
        else:
            out.insert(i, draw(chunk(names)))
    return out


@st.composite
def denoise_stream(draw, mesh, real) -> list[denoiser_pb2.DenoiseRequest]:
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "latents"]
    fields = dict(model=draw(st.sampled_from([mesh.model, ""]) | TEXT), width=draw(SMALL), height=draw(SMALL),
                  num_frames=draw(st.sampled_from([1, 5, 0, 2, -1, 2**31 - 1])),
                  num_inference_steps=draw(st.sampled_from([1, 2, 0, -1, 201, 2**31 - 1])),
                  guidance_scale=draw(DOUBLES), seed=draw(st.integers(-(2**63), 2**63 - 1)),
                  request_id=draw(st.sampled_from(["", "req-1"]) | TEXT))
    optional = dict(num_outputs=st.sampled_from([1, 2, 0, 11, -1]), true_cfg_scale=DOUBLES, guidance_scale_2=DOUBLES)
    for name, strategy in optional.items():
        if draw(st.booleans()):
            fields[name] = draw(strategy)
    valid = draw(st.integers(0, 2)) == 0          # a third keep the real params: the tensors decide
    head = [denoiser_pb2.DenoiseRequest(params=params(mesh) if valid else denoiser_pb2.DenoiseParams(**fields))]
    if valid or draw(st.booleans()):
        tensors = draw(mutated(real["embeddings"], names))
    else:
        tensors = draw(st.lists(chunk(names), max_size=6))
    stream = head + [denoiser_pb2.DenoiseRequest(tensor=t) for t in tensors]
    if draw(st.integers(0, 9)) == 0:     # params twice, params late, an empty message
        stream.insert(draw(st.integers(0, len(stream))), draw(st.sampled_from(
            [denoiser_pb2.DenoiseRequest(), head[0]])))
    return stream


@st.composite
def decode_stream(draw, mesh, real) -> list[decoder_pb2.DecodeRequest]:
    fields = dict(model=draw(st.sampled_from([mesh.model, ""]) | TEXT), format=draw(st.integers(-2, 5)),
                  return_frames=draw(st.booleans()), request_id=draw(st.sampled_from(["", "r"]) | TEXT))
    if draw(st.booleans()):
        fields["fps"] = draw(INT32)
    head = [decoder_pb2.DecodeRequest(params=decoder_pb2.DecodeParams(**fields))]
    tensors = draw(mutated(real["latents"], ["latents"]) if draw(st.booleans())
                   else st.lists(chunk(["latents"]), max_size=4))
    stream = head + [decoder_pb2.DecodeRequest(tensor=t) for t in tensors]
    if draw(st.integers(0, 9)) == 0:
        stream.insert(draw(st.integers(0, len(stream))), draw(st.sampled_from([decoder_pb2.DecodeRequest(), head[0]])))
    return stream


def expect_clean_status(call, *args, **kwargs) -> grpc.StatusCode:
    """Run a call to its end; the status it ends with, which must not be a bug or a hang."""
    try:
        for _ in call(*args, timeout=CALL_TIMEOUT_S, **kwargs):
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert error.code() not in FORBIDDEN, f"{error.code()}: {error.details()}"
        assert "Traceback" not in (error.details() or "")
        return error.code()


def assert_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


CODES: dict[str, dict[str, int]] = {}


def note(kind: str, code: grpc.StatusCode) -> None:
    CODES.setdefault(kind, {}).setdefault(code.name, 0)
    CODES[kind][code.name] += 1


@seed(20261201)
@settings(max_examples=200, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_denoise_streams_get_clean_statuses(mesh, channels, real_streams, data):
    stream = data.draw(denoise_stream(mesh, real_streams))
    note("denoise", expect_clean_status(denoise_call(channels), iter(stream), metadata=data.draw(METADATA)))


@seed(20261202)
@settings(max_examples=150, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_decode_streams_get_clean_statuses(mesh, channels, real_streams, data):
    call = channels["decoder"].stream_stream(
        "/diffmesh.v1.Decoder/Decode", request_serializer=decoder_pb2.DecodeRequest.SerializeToString,
        response_deserializer=decoder_pb2.DecodeResponse.FromString)
    note("decode", expect_clean_status(call, iter(data.draw(decode_stream(mesh, real_streams))),
                                       metadata=data.draw(METADATA)))


@seed(20261203)
@settings(max_examples=150, **FUZZ_SETTINGS)
@given(model=st.sampled_from(["", "x"]) | TEXT, prompt=st.text(max_size=300), negative=TEXT,
       guidance=DOUBLES, true_cfg=st.none() | DOUBLES, max_len=st.none() | INT32, image=st.binary(max_size=512),
       width=SMALL, height=SMALL, frames=INT32, metadata=METADATA, which=st.sampled_from(["encode", "image"]))
def test_fuzzed_unary_stage_calls_get_clean_statuses(mesh, channels, model, prompt, negative, guidance, true_cfg,
                                                    max_len, image, width, height, frames, metadata, which):
    model = mesh.model if model == "" else model
    if which == "encode":
        request = encoder_pb2.EncodeRequest(model=model, prompt=prompt, negative_prompt=negative,
                                            guidance_scale=guidance, image=image if len(image) % 2 else b"")
        if true_cfg is not None:
            request.true_cfg_scale = true_cfg
        if max_len is not None:
            request.max_sequence_length = max_len
        call = channels["encoder"].unary_stream("/diffmesh.v1.Encoder/Encode",
                                               request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
                                               response_deserializer=tensor_pb2.TensorChunk.FromString)
    else:
        request = decoder_pb2.EncodeImageRequest(model=model, image=image, width=width, height=height,
                                                 num_frames=frames)
        call = channels["decoder"].unary_stream("/diffmesh.v1.Decoder/EncodeImage",
                                               request_serializer=decoder_pb2.EncodeImageRequest.SerializeToString,
                                               response_deserializer=tensor_pb2.TensorChunk.FromString)
    note(which, expect_clean_status(call, request, metadata=metadata))


def test_every_stage_still_serves_after_the_fuzzing(mesh, channels, real_streams):
    for channel in channels.values():
        assert_serving(channel)
    # And still does real work: the real stream denoises to latents again.
    requests = [denoiser_pb2.DenoiseRequest(params=params(mesh))] + [
        denoiser_pb2.DenoiseRequest(tensor=c) for c in real_streams["embeddings"]]
    kinds = [event.WhichOneof("item") for event in denoise_call(channels)(iter(requests), timeout=60)]
    assert "tensor" in kinds
    print("fuzzed stage calls by final status:", CODES)
