"""The VAE decode against encoding its output as files, and what the decoder gains by freeing its VAE before them.

Three cases, at the real models' shapes with random weights (real weights cannot be downloaded here): Wan2.1's VAE
(AutoencoderKLWan's default config) decoding 81 frames at 480x832 to an MP4 and one frame at 480x832 to a PNG, and
FLUX.1's VAE (bench/family_shapes.py's config) decoding 1024x1024 to a PNG.

1. In this process, the decoder engine's own path: `decode_pixels` (the VAE, the rounding to uint8 on the device, the
   copy to the host; what the decoder's VAE gate covers) against the files made from its pixels afterwards (the PNG
   or MP4 of services/decoder/media.py through a `FileWriter`), and both as the decoder serves them, streamed: the
   writer encoding on another thread while the VAE hands over its chunks (`streamed_ms`, against
   `vae_then_files_ms`), and, for images, the gateway's JPEG and WebP made from that PNG
   (`media_assets.encode_image`, as the REST API's output_format does). The issue's target: a file costs no more
   than the VAE decode that made it.
2. Through a real `diffmesh serve decoder` on the same model directory: --requests Decode calls (default 3) sent
   at once against the same calls sent one after another, which is what the decoder did with every batch of calls
   before it freed its VAE early (each call's files encoded before the next VAE decode). Reported: the wall time for
   all of them, and the decoder's own phase time from its /metrics (diffmesh_decode_seconds, diffmesh_media_encode_
   seconds): their sum is the one-after-another time the overlap can hide from.

Before timing, every file is checked: a PNG decodes to the engine's pixels exactly, an MP4 holds the frames at the
right size, and the PNGs of calls sent at once equal those of the same calls one after another (the MP4s' bytes are
compared and reported, not required: x264's AVX-512 code differs run to run, services/decoder/media.py).
Random weights make the frames noise-like, which costs the encoders more than real pictures do. Writes
bench/results/media-<device>-<date>.json.

    python3 bench/media.py --device cuda
    python3 bench/media.py --device cpu         # a smoke run: the same VAEs at tiny shapes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import io
import json
import os
import pathlib
import platform as host_platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import diffusers  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from diffmesh.v1 import decoder_pb2, decoder_pb2_grpc  # noqa: E402
from services.common.platform import set_platform  # noqa: E402
from services.common.tensors import iter_chunks  # noqa: E402

START_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Case:
    family: str                          # the model directory it decodes with: wan | flux
    latents: tuple[int, ...]             # at the real shapes
    smoke: tuple[int, ...]               # on CPU
    format: str                          # png | mp4


CASES = {
    "wan-480x832x81": Case("wan", (1, 16, 21, 60, 104), (1, 16, 3, 8, 8), "mp4"),
    "wan-480x832-image": Case("wan", (1, 16, 1, 60, 104), (1, 16, 1, 8, 8), "png"),
    "flux-1024x1024": Case("flux", (1, 16, 128, 128), (1, 16, 16, 16), "png"),
}
MEDIA_FORMAT = {"png": decoder_pb2.MEDIA_FORMAT_PNG, "mp4": decoder_pb2.MEDIA_FORMAT_MP4}


def write_model(family: str, path: pathlib.Path, device: torch.device, dtype: torch.dtype) -> pathlib.Path:
    """A model directory with what the decoder reads: the VAE (random weights at the real config) and an index."""
    from diffusers import AutoencoderKL, AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        if family == "wan":
            vae = AutoencoderKLWan()
            index = {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"],
                     "transformer": ["diffusers", "WanTransformer3DModel"]}
            transformer = {"patch_size": [1, 2, 2], "rope_max_seq_len": 1024}           # Wan2.1's
        else:
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, scaling_factor=0.3611,
                                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                                sample_size=1024)                       # FLUX.1-dev's, as bench/family_shapes.py
            index = {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"],
                     "transformer": ["diffusers", "FluxTransformer2DModel"]}
            transformer = {"guidance_embeds": True}
    # The family reads the transformer's config for its limits; the decoder loads no transformer.
    (path / "transformer").mkdir(parents=True)
    (path / "transformer" / "config.json").write_text(json.dumps(transformer))
    vae.to(dtype).save_pretrained(path / "vae")
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def timed_s(fn, repeats: int) -> tuple[float, object]:
    """The median of `repeats` timed calls after one untimed, and the last result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def check_png(data: bytes, pixels: np.ndarray) -> None:
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decoded, pixels), "the PNG does not decode to the engine's pixels"


def check_mp4(data: bytes, shape: tuple[int, ...]) -> None:
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    assert len(frames) == shape[0] and frames[0].shape == tuple(shape[1:]), (len(frames), frames[0].shape, shape)


def in_process(case: Case, engine, latents: torch.Tensor, repeats: int) -> dict:
    from services.decoder.engine import DecodeParams
    from services.decoder.writer import FileWriter
    from services.gateway import media_assets

    params = DecodeParams("bench", format=case.format)
    kept: list[np.ndarray] = []

    class Kept(FileWriter):
        """Keeps the pixels handed over, for the files timed apart below."""

        def add(self, pixels: np.ndarray) -> None:
            kept.append(pixels)

    def vae() -> None:
        kept.clear()
        engine.decode_pixels(params, latents, Kept(case.format))

    def files():
        writer = FileWriter(case.format)
        for chunk in kept:
            writer.add(chunk)
        writer.close()
        return writer.write()

    def streamed():
        # As the decoder serves: the files written on another thread while the VAE hands over its chunks.
        writer = engine.file_writer(params, latents)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            written = pool.submit(writer.write)
            engine.decode_pixels(params, latents, writer)
            return written.result()

    vae_s, _ = timed_s(vae, repeats)
    pixels = np.concatenate(kept, axis=1)
    files_s, [item] = timed_s(files, repeats)
    streamed_s, _ = timed_s(streamed, repeats)
    result = {"latents": list(latents.shape), "pixels": list(pixels.shape),
              "vae_decode_ms": round(1000 * vae_s, 2), "vae_then_files_ms": round(1000 * (vae_s + files_s), 2),
              "streamed_ms": round(1000 * streamed_s, 2),
              "files": {case.format: {"ms": round(1000 * files_s, 2), "bytes": len(item.data)}}}
    if case.format == "png":
        check_png(item.data, pixels[0, 0])
        for output_format in ("jpeg", "webp"):
            seconds, (data, _) = timed_s(lambda f=output_format: media_assets.encode_image(item.data, f), repeats)
            assert Image.open(io.BytesIO(data)).size == pixels.shape[3:1:-1]
            result["files"][output_format] = {"ms": round(1000 * seconds, 2), "bytes": len(data), "from": "the PNG"}
    else:
        check_mp4(item.data, pixels.shape[1:])
        found = re.search(rb"x264 - core (\d+)", item.data)
        result["x264_core"] = int(found.group(1)) if found else None
    for timing in result["files"].values():
        timing["over_vae_decode"] = round(timing["ms"] / result["vae_decode_ms"], 3)
    return result


class DecoderServer:
    """`diffmesh serve decoder` on `model_dir`, in its own process."""

    def __init__(self, model_dir: pathlib.Path, device: str, tmp: pathlib.Path) -> None:
        port_file = tmp / f"decoder-port-{model_dir.name}"
        self.log = open(tmp / f"decoder-{model_dir.name}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffmesh.cli", "serve", "decoder", "--model", str(model_dir), "--device", device,
             "--port", "0", "--port-file", str(port_file), "--grace", "5"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the decoder did not start; see {self.log.name}")
            time.sleep(0.2)
        grpc_port, metrics_port = port_file.read_text().split()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
            ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
        self.stub = decoder_pb2_grpc.DecoderStub(self.channel)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def decode(self, latents: torch.Tensor, fmt: str, request_id: str) -> list[bytes]:
        def requests():
            yield decoder_pb2.DecodeRequest(params=decoder_pb2.DecodeParams(request_id=request_id,
                                                                            format=MEDIA_FORMAT[fmt]))
            for chunk in iter_chunks("latents", latents):
                yield decoder_pb2.DecodeRequest(tensor=chunk)

        files: dict[int, bytes] = {}
        for response in self.stub.Decode(requests(), timeout=600):
            files[response.media.index] = files.get(response.media.index, b"") + response.media.data
        return [files[index] for index in sorted(files)]

    def phase_seconds(self) -> dict[str, float]:
        """The decoder's phase totals so far (seconds), from its /metrics."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        totals = {"decode_s": 0.0, "media_encode_s": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "diffmesh_decode_seconds_sum":
                    totals["decode_s"] += sample.value
                elif sample.name == "diffmesh_media_encode_seconds_sum":
                    totals["media_encode_s"] += sample.value
        return totals

    def stop(self) -> None:
        self.channel.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def through_server(server: DecoderServer, case: Case, batch: list[torch.Tensor], repeats: int) -> dict:
    """`batch` decoded one after another and all at once, alternately `repeats` times (drift hits both alike)."""
    server.decode(batch[0], case.format, "warmup")

    def one_after_another() -> list[list[bytes]]:
        return [server.decode(x, case.format, f"seq-{i}") for i, x in enumerate(batch)]

    def at_once() -> list[list[bytes]]:
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(lambda ix: server.decode(ix[1], case.format, f"together-{ix[0]}"), enumerate(batch)))

    runs: dict[str, list[dict]] = {"one_after_another": [], "at_once": []}
    files: dict[str, list[list[bytes]]] = {}
    for _ in range(repeats):
        for mode, run in (("one_after_another", one_after_another), ("at_once", at_once)):
            before = server.phase_seconds()
            started = time.perf_counter()
            files[mode] = run()
            seconds = time.perf_counter() - started
            after = server.phase_seconds()
            runs[mode].append({"wall_s": round(seconds, 4),
                               **{name: round(after[name] - before[name], 4) for name in after}})
    magic = {"png": (0, b"\x89PNG"), "mp4": (4, b"ftyp")}[case.format]
    for outputs in files.values():
        assert all(len(call) == len(x) for call, x in zip(outputs, batch, strict=True))
        assert all(data[magic[0]:magic[0] + 4] == magic[1] for call in outputs for data in call), case.format
    identical = files["at_once"] == files["one_after_another"]
    if case.format == "png":
        assert identical, "PNGs of calls sent at once differ from the same calls one after another"
    best = {mode: min(entries, key=lambda entry: entry["wall_s"]) for mode, entries in runs.items()}
    at_once = best["at_once"]
    return {"requests": len(batch), "runs": runs,
            "one_after_another_s": best["one_after_another"]["wall_s"], "at_once_s": at_once["wall_s"],
            "speedup": round(best["one_after_another"]["wall_s"] / at_once["wall_s"], 3),
            # What the gate held around both phases would have taken at least for the same calls at once: every
            # VAE decode and every file, one after another.
            "at_once_phases_in_series_s": round(at_once["decode_s"] + at_once["media_encode_s"], 4),
            "files_identical": identical}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 on an accelerator, 1 "
                        "on CPU)")
    parser.add_argument("--requests", type=int, default=3, help="Decode calls sent together to the server")
    parser.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny shapes (default: on CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    platform = set_platform(args.device)
    device = platform.device(0)
    smoke = platform.kind == "cpu" if args.smoke is None else args.smoke
    repeats = args.repeats or (3 if platform.kind != "cpu" else 1)
    dtype = platform.default_dtype()
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    load_before = os.getloadavg()[0]

    from services.common.models import resolve_model_dir
    from services.decoder.engine import DecoderEngine

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        families = sorted({CASES[name].family for name in names})
        dirs = {family: write_model(family, pathlib.Path(tmp) / family, device, dtype) for family in families}
        for family in families:
            cases = [name for name in names if CASES[name].family == family]
            engine = DecoderEngine(resolve_model_dir(str(dirs[family])), platform, dtype)
            generator = torch.Generator().manual_seed(1)
            batches = {}
            for name in cases:
                case = CASES[name]
                shape = case.smoke if smoke else case.latents
                batches[name] = [torch.randn(shape, generator=generator) for _ in range(args.requests)]
                results[name] = {"in_process": in_process(case, engine, batches[name][0], repeats)}
                print(f"{name}: {json.dumps(results[name]['in_process'])}", flush=True)
            del engine
            platform.empty_cache()
            server = DecoderServer(dirs[family], args.device, pathlib.Path(tmp))
            try:
                for name in cases:
                    results[name]["server"] = through_server(server, CASES[name], batches[name], repeats)
                    print(f"{name} through the server: {json.dumps(results[name]['server'])}", flush=True)
            finally:
                server.stop()

    report = {
        "benchmark": "VAE decode against its files (PNG, JPEG, WebP, MP4), and the decoder's VAE freed before them",
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "device": platform.device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "av": av.__version__,
                     "ffmpeg": {name: ".".join(map(str, version)) for name, version in av.library_versions.items()},
                     "pillow": PIL.__version__, "python": host_platform.python_version()},
        "dtype": str(dtype).removeprefix("torch."),
        "smoke": smoke,
        "repeats": repeats,
        # Other work on the host skews CPU numbers most, as bench/transport.py records it.
        "host": {"cpus": os.cpu_count(), "cpu": host_platform.processor() or host_platform.machine(),
                 "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)},
        "cases": results,
        "notes": ("random weights at the real VAE configs: noise-like frames, the encoders' worst case. in_process: "
                  "medians; vae_decode_ms is decode_pixels (VAE + uint8 + copy to the host, what the VAE gate "
                  "covers), files are the decoder's FileWriter on those pixels afterwards, streamed_ms the two as "
                  "the decoder serves them (the writer on another thread as the chunks come), and "
                  "media_assets.encode_image (the gateway's JPEG/WebP from the PNG). server: the best of the "
                  "repeats; decode_s and media_encode_s are the "
                  "decoder's own phase totals over the run."
                  + (" SMOKE: tiny shapes, nothing here says anything about speed." if smoke else "")),
    }
    name = f"media-{platform.kind}-{report['date']}.json"
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / name)
    if out.is_dir():        # a folder: the file goes in it under its usual name
        out = out / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        files = ", ".join(f"{fmt} {timing['ms']} ms" for fmt, timing in result["in_process"]["files"].items())
        server = result["server"]
        print(f"{name}: VAE {result['in_process']['vae_decode_ms']} ms; {files}; {server['requests']} calls "
              f"{server['one_after_another_s']} s one after another, {server['at_once_s']} s at once")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
