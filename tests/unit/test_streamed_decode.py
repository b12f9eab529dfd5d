"""A video's frames go from the VAE to its MP4 chunk by chunk: the Wan VAE's chunks are exactly its whole decode
(Wan2.1's tiny VAE and Wan2.2's, which unpatchifies), a tiled decode stays whole, the file writer encodes chunks as
they come and its MP4 plays back as the frames, and a decode that fails leaves no file behind.

Through the real decoder server: tests/integration/test_decoder_files.py and every MP4 the mesh tests make."""

from __future__ import annotations

import io
import queue
import tempfile
import threading
import time

import av
import numpy as np
import pytest
import torch

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny.wan22 import write_tiny_wan22_ti2v
from services.common.tiny_model import write_tiny_model
from services.decoder.engine import DecodeParams, DecoderEngine
from services.decoder.writer import FileWriter, WriteAborted

from .test_decoder_files import smooth_frames


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2-ti2v"])
def engine(request, tmp_path_factory):
    write = write_tiny_model if request.param == "wan2.1" else write_tiny_wan22_ti2v
    return DecoderEngine(resolve_model_dir(write(tmp_path_factory.mktemp("streamed") / "m")), PLATFORMS["cpu"])


def latents_for(engine: DecoderEngine, frames: int, height: int, width: int) -> torch.Tensor:
    z = engine.decoding.z_dim
    return torch.randn((1, z, frames, height, width), generator=torch.Generator().manual_seed(3))


def test_the_wan_vaes_chunks_are_its_whole_decode_bit_for_bit(engine):
    latents = latents_for(engine, 3, 4, 6)
    with torch.inference_mode():
        whole = engine.decoding.decode(latents)
        chunks = list(engine.decoding.decode_chunks(latents))
    assert [chunk.shape[1] for chunk in chunks] == [1, 4, 4]             # a latent frame at a time: 1 + 4 + 4
    assert torch.equal(torch.cat(chunks, dim=1), whole)
    assert whole.shape[1] == 9 and whole.dtype == torch.float32


def test_a_tiled_decode_comes_whole(engine):
    vae = engine.decoding.vae
    scale = vae.spatial_compression_ratio
    latents = latents_for(engine, 2, 6, 10)
    vae.enable_tiling(tile_sample_min_height=4 * scale, tile_sample_min_width=4 * scale,
                      tile_sample_stride_height=3 * scale, tile_sample_stride_width=3 * scale)
    try:
        with torch.inference_mode():
            chunks = list(engine.decoding.decode_chunks(latents))
            tiled = engine.decoding.decode(latents)
    finally:
        vae.disable_tiling()
    assert len(chunks) == 1 and torch.equal(chunks[0], tiled)


def test_the_engine_hands_each_chunk_to_the_files_as_it_is_decoded(engine):
    latents = latents_for(engine, 3, 4, 6)
    params = DecodeParams("r", return_frames=True)
    files = engine.file_writer(params, latents)
    assert files.format == "mp4"
    seen: list[int] = []
    chunks = engine.decoding.decode_chunks

    def watched(x):
        for chunk in chunks(x):
            yield chunk
            seen.append(files.pending())           # right after the engine handed this chunk over

    engine.decoding.decode_chunks = watched
    try:
        frames = engine.decode_pixels(params, latents, files)
    finally:
        del engine.decoding.decode_chunks
    seen.append(files.pending())
    assert seen == [1, 2, 3, 4]             # each chunk handed over before the next is decoded; then the close
    [video] = files.write()
    assert video.mime_type == "video/mp4"
    with torch.inference_mode():
        assert np.array_equal(frames, engine.decoding.decode(latents).numpy())
    with av.open(io.BytesIO(video.data)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 9


def test_the_writer_encodes_chunks_while_more_are_coming_and_plays_back_as_the_frames():
    frames = smooth_frames(9, 48, 72)
    files = FileWriter("mp4", fps=16)
    result: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: result.put(files.write()))
    thread.start()
    files.add(frames[None, :1])
    deadline = time.monotonic() + 10
    while files.pending() and time.monotonic() < deadline:       # the writer takes the first chunk before the rest
        time.sleep(0.01)
    assert files.pending() == 0, "the writer did not take a chunk until the decode ended"
    files.add(frames[None, 1:5])
    files.add(frames[None, 5:])
    files.close()
    thread.join(30)
    [video] = result.get_nowait()
    with av.open(io.BytesIO(video.data)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 16
        played = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    assert played.shape == frames.shape
    psnr = 10 * np.log10(255 ** 2 / np.mean((played.astype(np.float64) - frames) ** 2))
    assert psnr > 35, f"{psnr:.1f} dB"


def test_a_failed_decode_aborts_the_files_and_leaves_no_file_behind(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    latents = latents_for(engine, 3, 4, 6)
    params = DecodeParams("r")
    files = engine.file_writer(params, latents)
    result: queue.Queue = queue.Queue()

    def write() -> None:
        try:
            result.put(files.write())
        except WriteAborted as aborted:
            result.put(aborted)

    thread = threading.Thread(target=write)
    thread.start()
    chunks = engine.decoding.decode_chunks

    def fails_after_one(x):
        source = chunks(x)
        yield next(source)
        raise RuntimeError("out of memory")

    engine.decoding.decode_chunks = fails_after_one
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.decode_pixels(params, latents, files)
    finally:
        del engine.decoding.decode_chunks
    thread.join(30)
    assert isinstance(result.get_nowait(), WriteAborted)
    assert list(tmp_path.iterdir()) == []


def test_a_png_is_one_frame_per_output_and_none_writes_nothing():
    files = FileWriter("png")
    files.add(smooth_frames(1, 16, 16)[None].repeat(2, axis=0))
    files.close()
    assert [item.mime_type for item in files.write()] == ["image/png"] * 2
    files = FileWriter("none")
    files.add(smooth_frames(1, 16, 16)[None])
    files.close()
    assert files.write() == [] and files.pending() == 0
    with pytest.raises(ValueError, match="'gif' is not png, mp4 or none"):
        FileWriter("gif")


def test_files_given_up_elsewhere_stop_the_decode_at_its_next_chunk(engine):
    latents = latents_for(engine, 4, 4, 6)
    files = engine.file_writer(DecodeParams("r"), latents)
    decoded: list[int] = []
    chunks = engine.decoding.decode_chunks

    def counted(x):
        for chunk in chunks(x):
            decoded.append(chunk.shape[1])
            files.abort()                         # the caller goes away while the first chunk decodes
            yield chunk

    engine.decoding.decode_chunks = counted
    try:
        with pytest.raises(WriteAborted, match="given up during its decode"):
            engine.decode_pixels(DecodeParams("r"), latents, files)
    finally:
        del engine.decoding.decode_chunks
    assert decoded == [1]                         # not handed over, and nothing more decoded
    with pytest.raises(WriteAborted):
        files.write()
    assert WriteAborted("x").grpc_code.name == "CANCELLED"
