"""The decoder holds its VAE for the VAE's part only, through the real server: of two Decode calls sent together to
`diffmesh serve decoder` (the tiny FLUX.1 model, tracing to the session's OTLP receiver), the second's VAE decode
starts before the first's files are done, the VAE still decodes one call at a time, and each call's files are byte
for byte the ones it gets alone.

The observable is the decoder's own phase spans, `diffmesh.decode` (the VAE) and `diffmesh.media_encode` (the
files), with their start and end, each call in a trace of its own. Each call decodes two 480x832 images (about
0.15 s of VAE on the 2-core machine) to PNGs (about 0.1 s), so the overlap is a tenth of a second, far beyond the
scheduling between one call leaving the VAE and the next entering it; were the files encoded inside the gate, the
second decode could only start after the first's files were done.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import secrets
import time

import grpc
import pytest
import torch

from diffmesh.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.tensors import iter_chunks

from .conftest import FLUX_DEV
from .otlp_receiver import ReceivedSpan
from .test_gang import DenoiserProcess

LATENTS = (2, 16, 60, 104)          # two 480x832 images of the tiny FLUX.1 VAE (16 latent channels, 8x)
SPANS_TIMEOUT_S = 30.0
PHASES = ("diffmesh.decode", "diffmesh.media_encode")


@pytest.fixture(scope="module")
def decoder(flux_dirs, trace_receiver, tmp_path_factory):
    process = DenoiserProcess(flux_dirs[FLUX_DEV], tmp_path_factory.mktemp("decoder-files"), [], stage="decoder",
                              env={"OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
                                   "OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield process
    assert process.stop() == 0, "".join(process.log[-30:])


def decode(address: str, latents: torch.Tensor, trace_id: str) -> list[bytes]:
    """The files one Decode call returns, the call in trace `trace_id`."""
    def requests():
        yield decoder_pb2.DecodeRequest(params=decoder_pb2.DecodeParams(
            request_id=f"files-{trace_id[:8]}", model=FLUX_DEV, format=decoder_pb2.MEDIA_FORMAT_PNG))
        for chunk in iter_chunks("latents", latents):
            yield decoder_pb2.DecodeRequest(tensor=chunk)

    stub = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 16 << 20)]))
    files: dict[int, bytes] = {}
    metadata = (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),)
    for response in stub.Decode(requests(), metadata=metadata, timeout=120):
        files[response.media.index] = files.get(response.media.index, b"") + response.media.data
    return [files[index] for index in sorted(files)]


def phases(receiver, trace_id: str) -> dict[str, ReceivedSpan]:
    wanted = {("diffmesh-decoder", name) for name in PHASES}
    seen = receiver.wait_for_spans(trace_id, wanted, SPANS_TIMEOUT_S)
    assert wanted <= seen, f"trace {trace_id} has {sorted(seen)} only"
    spans = [span for span in receiver.spans(trace_id) if span.service == "diffmesh-decoder" and span.name in PHASES]
    assert sorted(span.name for span in spans) == sorted(PHASES)        # one of each per call
    return {span.name: span for span in spans}


def test_the_next_calls_vae_decode_overlaps_this_calls_files_which_stay_the_same(decoder, trace_receiver):
    generator = torch.Generator().manual_seed(11)
    latents = [torch.randn(LATENTS, generator=generator) for _ in range(2)]
    alone = [decode(decoder.address, x, secrets.token_hex(16)) for x in latents]       # one after another

    traces = [secrets.token_hex(16) for _ in latents]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(decode, [decoder.address] * 2, latents, traces))

    assert [len(files) for files in together] == [2, 2] and together[0][0].startswith(b"\x89PNG")
    assert together == alone, "files decoded together differ from the same calls decoded one after another"
    first, second = sorted((phases(trace_receiver, trace) for trace in traces),
                           key=lambda spans: spans["diffmesh.decode"].start_ns)
    assert first["diffmesh.media_encode"].end_ns >= first["diffmesh.decode"].end_ns
    assert second["diffmesh.decode"].start_ns >= first["diffmesh.decode"].end_ns, "two VAE decodes at once"
    overlap_s = (first["diffmesh.media_encode"].end_ns - second["diffmesh.decode"].start_ns) / 1e9
    assert overlap_s > 0, f"the second decode started {-overlap_s:.3f} s after the first call's files were done"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux's /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_gone_mid_video_frees_the_vae_at_the_next_latent_frame(model_dir, tmp_path):
    """A 41-latent-frame video of the tiny Wan (about half a second of VAE per latent frame on the 2-core machine)
    whose client gives up after 2 s: its decode stops at the next latent frame, so a call sent then gets the VAE at
    once instead of after the many seconds the rest of the video would take."""
    decoder = DenoiserProcess(model_dir, tmp_path, [], stage="decoder")
    try:
        stub = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(decoder.address, options=[
            ("grpc.max_receive_message_length", 64 << 20)]))

        def requests(request_id: str, latents: torch.Tensor):
            yield decoder_pb2.DecodeRequest(params=decoder_pb2.DecodeParams(request_id=request_id, model="wan2.1-tiny"))
            for chunk in iter_chunks("latents", latents):
                yield decoder_pb2.DecodeRequest(tensor=chunk)

        generator = torch.Generator().manual_seed(4)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Decode(requests("long-video", torch.randn((1, 16, 41, 30, 52), generator=generator)),
                             timeout=2))
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        started = time.monotonic()
        responses = list(stub.Decode(requests("next", torch.randn((1, 16, 3, 4, 6), generator=generator)),
                                     timeout=60))
        waited = time.monotonic() - started
        assert b"".join(r.media.data for r in responses if r.WhichOneof("item") == "media")[4:8] == b"ftyp"
        assert waited < 10, f"the next call took {waited:.1f} s: the cancelled video kept the VAE"
        # The long call ended (its access line) one latent frame or so after its deadline, not after its video,
        # and its decode ended with it: the decoder, idle now, burns no more CPU (the rest of the video would keep
        # a core busy for many seconds).
        [ended] = [line for line in decoder.log if "Decoder/Decode CANCELLED" in line]
        assert float(ended.split()[-1].removesuffix("ms")) < 8000, "".join(decoder.log[-15:])
        time.sleep(0.5)
        before = cpu_seconds(decoder.process.pid)
        time.sleep(2.0)
        assert cpu_seconds(decoder.process.pid) - before < 0.5, "the cancelled video is still decoding"
    finally:
        assert decoder.stop() == 0, "".join(decoder.log[-30:])
