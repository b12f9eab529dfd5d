"""The decoder gang through its real gRPC service: `diffmesh serve decoder --devices 2 --device cpu` (two processes,
gloo) returns the frames a one-device decoder returns.

The reference is the session mesh's own decoder (one device, the same tiny Wan2.1 model). The latents are 9 rows
high, so the two ranks decode slabs of 5 and 4 rows, and the video's have 3 latent frames (9 frames), so the
causal convolutions' caches cross the seam too. Checked: the frames (float32 in 0..1) differ by at most 1e-5
(max abs), and the files come back as the one device sends them (MP4 for video, PNG for an image).
"""

from __future__ import annotations

import grpc
import pytest
import torch

from diffmesh.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.tensors import TensorAssembler, iter_chunks

from .test_gang import DenoiserProcess

TOLERANCE = 1e-5
# [n, z, T, H, W]: 9 latent rows (5 + 4 over two ranks), 6 columns; 3 latent frames -> 9 frames, and one.
LATENTS = {"video": (1, 16, 3, 9, 6), "image": (1, 16, 1, 9, 6)}
MIME = {"video": "video/mp4", "image": "image/png"}


def decode(address: str, model: str, latents: torch.Tensor) -> tuple[torch.Tensor, list[str], bytes]:
    """Frames, the media's MIME types and the first file's bytes, as a Decode call returns them."""
    def requests():
        yield decoder_pb2.DecodeRequest(params=decoder_pb2.DecodeParams(request_id="decoder-gang-test", model=model,
                                                                        return_frames=True))
        for chunk in iter_chunks("latents", latents):
            yield decoder_pb2.DecodeRequest(tensor=chunk)

    stub = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 16 << 20)]))
    assembler, mime_types, first_file = TensorAssembler(), [], b""
    for response in stub.Decode(requests(), timeout=120):
        if response.WhichOneof("item") == "media":
            if response.media.index == 0:
                first_file += response.media.data
            if response.media.last:
                mime_types.append(response.media.mime_type)
        else:
            assembler.add(response.tensor)
    return assembler.finish()["frames"], mime_types, first_file


@pytest.fixture(scope="module")
def gang(model_dir, tmp_path_factory):
    process = DenoiserProcess(model_dir, tmp_path_factory.mktemp("decoder-gang"), ["--devices", "2"], stage="decoder")
    yield process
    assert process.stop() == 0, "".join(process.log[-30:])


@pytest.mark.parametrize("kind", sorted(LATENTS))
def test_two_ranks_decode_the_frames_one_device_decodes(mesh, gang, kind):
    latents = torch.randn(*LATENTS[kind], generator=torch.Generator().manual_seed(5))
    expected, expected_mime, _ = decode(mesh.stages["decoder"], mesh.model, latents)
    frames, mime_types, data = decode(gang.address, mesh.model, latents)
    assert frames.shape == expected.shape == (1, 9 if kind == "video" else 1, 72, 48, 3)
    assert float(expected.std()) > 1e-3            # the latents reach the frames
    error = float((frames - expected).abs().max())
    assert error <= TOLERANCE, f"{kind}: max abs error {error:.3g} against one device"
    assert mime_types == expected_mime == [MIME[kind]]
    assert data[4:8] == b"ftyp" if kind == "video" else data.startswith(b"\x89PNG")


def test_a_request_the_model_cannot_take_fails_on_the_leader_and_the_gang_serves_on(mesh, gang):
    stub = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(gang.address))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.EncodeImage(decoder_pb2.EncodeImageRequest(request_id="t2v-has-no-image", model=mesh.model,
                                                             image=b"not used", width=48, height=72, num_frames=9),
                              timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in refused.value.details()
    frames, _, _ = decode(gang.address, mesh.model, torch.zeros(LATENTS["image"]))
    assert frames.shape == (1, 1, 72, 48, 3)
