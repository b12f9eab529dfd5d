"""The decoder's files off the VAE: the file encoders hold at most `workers + backlog` requests, give a place back
when its encoding ends (even one whose caller went away) and run in the caller's context; the MP4 encoder feeds
x264 frames with padded rows that hold swscale's conversion, and its files play back as the frames.

The overlap through the real server is tests/integration/test_decoder_files.py's."""

from __future__ import annotations

import asyncio
import io
import threading

import av
import numpy as np
import pytest

from services.common import logs
from services.decoder import media
from services.decoder.encoders import FileEncoders


def smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = [np.stack([127 + 100 * np.sin(x / 20 + f / 3), 127 + 100 * np.cos(y / 15 - f / 4),
                        127 + 100 * np.sin((x + y) / 30 + f / 2)], -1) for f in range(count)]
    return np.stack(frames).clip(0, 255).astype(np.uint8)


def test_a_request_waits_for_a_place_while_every_encoder_and_the_backlog_are_taken():
    async def scenario() -> list[str]:
        encoders = FileEncoders(workers=1, backlog=1)
        release = threading.Event()
        events: list[str] = []

        async def request(name: str) -> None:
            async with encoders.place() as place:
                events.append(f"{name} placed")
                await place.run(release.wait, 10)
            events.append(f"{name} done")

        tasks = [asyncio.create_task(request(name)) for name in ("a", "b", "c")]
        await asyncio.sleep(0.2)
        waiting = list(events)
        release.set()
        await asyncio.gather(*tasks)
        return waiting

    assert asyncio.run(scenario()) == ["a placed", "b placed"]       # c waits: 1 encoding, 1 in the backlog


def test_a_cancelled_request_keeps_its_place_until_its_encoding_ends():
    async def scenario() -> tuple[bool, bool]:
        encoders = FileEncoders(workers=1, backlog=0)
        release = threading.Event()

        async def request() -> None:
            async with encoders.place() as place:
                await place.run(release.wait, 10)

        first = asyncio.create_task(request())
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(request())
        await asyncio.sleep(0.2)
        placed_while_encoding = second.done()
        release.set()
        await asyncio.wait_for(second, 10)                         # the place comes back once the thread is done
        return placed_while_encoding, second.done()

    assert asyncio.run(scenario()) == (False, True)


def test_an_encoding_runs_in_its_callers_context_and_its_error_reaches_the_caller():
    def fails() -> None:
        raise ValueError("bad frames")

    async def scenario() -> str:
        encoders = FileEncoders()
        with logs.request_context("req-7"):
            async with encoders.place() as place:
                seen = await place.run(logs.request_id_var.get)
            with pytest.raises(ValueError, match="bad frames"):
                async with encoders.place() as place:
                    await place.run(fails)
        return seen

    assert asyncio.run(scenario()) == "req-7"


def test_file_encoders_refuse_no_workers():
    with pytest.raises(ValueError, match="at least 1 worker"):
        FileEncoders(workers=0)


@pytest.mark.parametrize("width", [832, 48, 1024])
def test_the_mp4_encoder_gets_swscales_planes_in_rows_padded_to_64_bytes(width):
    rgb = smooth_frames(1, 32, width)[0]
    frame = media.yuv420p_frame(rgb)
    expected = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
    assert np.array_equal(frame.to_ndarray(), expected)
    assert [plane.line_size % media.ROW_ALIGN for plane in frame.planes] == [0, 0, 0]


def test_an_mp4_plays_back_as_its_frames_from_the_start():
    frames = smooth_frames(9, 48, 72)
    data = media.encode_mp4(frames, fps=16)
    assert data.index(b"moov") < data.index(b"mdat")                # faststart: playable while it downloads
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 16 and stream.codec_context.pix_fmt == "yuv420p"
        played = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    assert played.shape == frames.shape
    psnr = 10 * np.log10(255 ** 2 / np.mean((played.astype(np.float64) - frames) ** 2))
    assert psnr > 35, f"{psnr:.1f} dB"
