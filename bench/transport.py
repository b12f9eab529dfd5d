"""Tensor transfer between two processes over real gRPC on loopback, in MiB/s.

Modes, each timed end to end on the client (encode into protobuf, send, receive, decode into torch on the
other end, and the reply):

* ``unary_upload``    client -> server, the whole tensor as one ``diffmesh.v1.Tensor`` message (the baseline;
                      both sides raise their message limits for this mode only, on a separate server port).
* ``unary_download``  server -> client, the same, for symmetry.
* ``stream_upload``   client -> server, a stream of ~1 MiB ``TensorChunk`` messages made by ``iter_chunks`` and
                      reassembled by ``TensorAssembler`` (how diffmesh stages move tensors), under the stages'
                      own ``CHANNEL_OPTIONS`` (16 MiB message limit).
* ``stream_download`` server -> client, the same.

The server is a separate process (this file with ``--serve``) running a ``grpc.aio`` server, like the stages,
with a benchmark-only generic handler over our real messages; no .proto of its own. Both processes build the
same seeded float32 tensor for each size and every transfer is checked with ``torch.equal`` (outside the timed
region) so the benchmark cannot silently measure garbage.

    python bench/transport.py --sizes 1,16,128 --repeats 5 --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import google.protobuf  # noqa: E402
import grpc  # noqa: E402
import torch  # noqa: E402

from diffmesh.v1 import tensor_pb2  # noqa: E402
from services.common.server import CHANNEL_OPTIONS  # noqa: E402
from services.common.tensors import CHUNK_BYTES, TensorAssembler, from_proto, iter_chunks, to_proto  # noqa: E402

SERVICE = "diffmesh.bench.Transport"
MIB = 1 << 20
TENSOR_NAME = "latents"
MODES = ("unary_upload", "unary_download", "stream_upload", "stream_download")

Tensor = tensor_pb2.Tensor
TensorChunk = tensor_pb2.TensorChunk


def big_options(max_mib: int) -> list[tuple[str, int]]:
    """Message limits for the unary baseline: room for the largest tensor plus protobuf framing."""
    limit = (max_mib + 16) * MIB
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def make_tensor(shape: list[int]) -> torch.Tensor:
    """The same float32 tensor in both processes: seeded from its shape, no external state."""
    generator = torch.Generator().manual_seed(1234 + sum(shape))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def shape_for(mib: int) -> list[int]:
    # float32, 1024 columns: 1 MiB = 256 rows of 1024.
    return [mib * MIB // 4 // 1024, 1024]


def ack(ok: bool = True) -> Tensor:
    return Tensor(dtype="bool", shape=[], data=b"\x01" if ok else b"\x00")


# ----------------------------------------------------------------------------------------------- server


class _State:
    def __init__(self) -> None:
        self.reference: torch.Tensor | None = None
        self.received: torch.Tensor | None = None


def _handlers(state: _State) -> grpc.GenericRpcHandler:
    # The request of Prepare / download calls is a Tensor whose dtype and shape name the tensor and whose
    # data is empty: a benchmark-only use of our real message, so no .proto is needed.

    async def prepare(request: Tensor, context) -> Tensor:
        state.reference = make_tensor(list(request.shape))
        state.received = None
        return ack()

    async def unary_upload(request: Tensor, context) -> Tensor:
        state.received = from_proto(request)
        return ack()

    async def unary_download(request: Tensor, context) -> Tensor:
        return to_proto(state.reference)

    async def stream_upload(request_iterator, context) -> Tensor:
        assembler = TensorAssembler([TENSOR_NAME])
        async for chunk in request_iterator:
            assembler.add(chunk)
        state.received = assembler.finish()[TENSOR_NAME]
        return ack()

    async def stream_download(request: Tensor, context):
        for chunk in iter_chunks(TENSOR_NAME, state.reference):
            yield chunk

    async def verify(request: Tensor, context) -> Tensor:
        ok = state.received is not None and torch.equal(state.received, state.reference)
        state.received = None
        return ack(ok)

    def unary(fn):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=Tensor.FromString, response_serializer=Tensor.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Prepare": unary(prepare),
            "Verify": unary(verify),
            "UnaryUpload": unary(unary_upload),
            "UnaryDownload": unary(unary_download),
            "StreamUpload": grpc.stream_unary_rpc_method_handler(
                stream_upload, request_deserializer=TensorChunk.FromString,
                response_serializer=Tensor.SerializeToString,
            ),
            "StreamDownload": grpc.unary_stream_rpc_method_handler(
                stream_download, request_deserializer=Tensor.FromString,
                response_serializer=TensorChunk.SerializeToString,
            ),
        },
    )


async def serve(max_mib: int) -> None:
    """Two servers over one state: the stages' limits for the stream modes, raised limits for the unary one."""
    state = _State()
    servers, ports = [], []
    for options in (CHANNEL_OPTIONS, big_options(max_mib)):
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((_handlers(state),))
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise RuntimeError("could not bind a loopback port")
        await server.start()
        servers.append(server)
        ports.append(port)
    print(f"PORTS {ports[0]} {ports[1]}", flush=True)
    # Exit when the parent closes our stdin (or dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers:
        await server.stop(0)


# ----------------------------------------------------------------------------------------------- client


class Client:
    def __init__(self, stream_port: int, unary_port: int, max_mib: int) -> None:
        self.stream_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stream_port}", options=CHANNEL_OPTIONS)
        self.unary_channel = grpc.aio.insecure_channel(f"127.0.0.1:{unary_port}", options=big_options(max_mib))
        method = f"/{SERVICE}/"
        s, u = self.stream_channel, self.unary_channel
        self.prepare = s.unary_unary(method + "Prepare", Tensor.SerializeToString, Tensor.FromString)
        self.verify = s.unary_unary(method + "Verify", Tensor.SerializeToString, Tensor.FromString)
        self.unary_upload = u.unary_unary(method + "UnaryUpload", Tensor.SerializeToString, Tensor.FromString)
        self.unary_download = u.unary_unary(method + "UnaryDownload", Tensor.SerializeToString, Tensor.FromString)
        self.stream_upload = s.stream_unary(method + "StreamUpload", TensorChunk.SerializeToString, Tensor.FromString)
        self.stream_download = s.unary_stream(
            method + "StreamDownload", Tensor.SerializeToString, TensorChunk.FromString
        )

    async def close(self) -> None:
        await self.stream_channel.close()
        await self.unary_channel.close()

    async def ready(self) -> None:
        await asyncio.wait_for(self.stream_channel.channel_ready(), 30)
        await asyncio.wait_for(self.unary_channel.channel_ready(), 30)

    async def once(self, mode: str, tensor: torch.Tensor, spec: Tensor) -> float:
        """One timed transfer, then an untimed check that the far side got (or we got) exactly `tensor`."""
        received = None
        start = time.perf_counter()
        if mode == "unary_upload":
            await self.unary_upload(to_proto(tensor))
        elif mode == "unary_download":
            received = from_proto(await self.unary_download(spec))
        elif mode == "stream_upload":
            await self.stream_upload(iter_chunks(TENSOR_NAME, tensor))
        elif mode == "stream_download":
            assembler = TensorAssembler([TENSOR_NAME])
            async for chunk in self.stream_download(spec):
                assembler.add(chunk)
            received = assembler.finish()[TENSOR_NAME]
        else:
            raise ValueError(mode)
        elapsed = time.perf_counter() - start
        if mode.endswith("upload"):
            ok = (await self.verify(spec)).data == b"\x01"
        else:
            ok = torch.equal(received, tensor)
        if not ok:
            raise SystemExit(f"{mode}: the received tensor differs from the one sent")
        return elapsed


async def run_client(sizes: list[int], repeats: int, stream_port: int, unary_port: int) -> dict:
    client = Client(stream_port, unary_port, max(sizes))
    results: dict[str, dict] = {}
    try:
        await client.ready()
        for mib in sizes:
            shape = shape_for(mib)
            tensor = make_tensor(shape)
            spec = Tensor(dtype="float32", shape=shape)
            await client.prepare(spec)
            per_mode = {}
            for mode in MODES:
                await client.once(mode, tensor, spec)  # warm-up, not timed
                times = [await client.once(mode, tensor, spec) for _ in range(repeats)]
                median = statistics.median(times)
                per_mode[mode] = {
                    "mib_per_s": round(mib / median, 1),
                    "median_s": round(median, 6),
                    "min_s": round(min(times), 6),
                    "times_s": [round(t, 6) for t in times],
                }
            results[f"{mib}MiB"] = {"mib": mib, "shape": shape, "dtype": "float32", "modes": per_mode}
            del tensor
    finally:
        await client.close()
    return results


# ----------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(results: dict) -> None:
    header = f"{'size':>7} | " + " | ".join(f"{m:>22}" for m in MODES)
    print(header)
    print("-" * len(header))
    for key, entry in results.items():
        cells = [
            f"{entry['modes'][m]['mib_per_s']:>8.1f} MiB/s {entry['modes'][m]['median_s'] * 1e3:>6.1f} ms"
            for m in MODES
        ]
        print(f"{key:>7} | " + " | ".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,128", help="tensor sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per size and mode (median)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON result")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) <= 0 or args.repeats <= 0:
        parser.error("--sizes must be positive integers and --repeats positive")

    if args.serve:
        asyncio.run(serve(max(sizes)))
        return 0

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--sizes", args.sizes],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = server.stdout.readline()
        if not line.startswith("PORTS "):
            raise SystemExit(f"benchmark server failed to start (exit {server.poll()})")
        stream_port, unary_port = (int(p) for p in line.split()[1:3])
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        results = asyncio.run(run_client(sizes, args.repeats, stream_port, unary_port))
        wall = time.perf_counter() - started
        load_after = os.getloadavg()[0]
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    now = datetime.datetime.now(datetime.UTC)
    report = {
        "benchmark": "transport",
        "date": now.isoformat(timespec="seconds"),
        "host": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            # Other work on the host skews the numbers: compare runs only at similar load.
            "load_avg_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "protobuf": google.protobuf.__version__,
        },
        "setup": {
            "transport": "grpc.aio client and server, insecure, 127.0.0.1, separate processes",
            "chunk_bytes": CHUNK_BYTES,
            "stream_channel_options": dict(CHANNEL_OPTIONS),
            "unary_channel_options": dict(big_options(max(sizes))),
            "repeats": args.repeats,
            "warmup": 1,
            "timed": "client wall time: encode to protobuf, transfer, decode into torch on the receiving side, reply",
            "verified": "torch.equal of received vs sent tensor after every transfer (untimed)",
            "wall_s": round(wall, 2),
        },
        "results": results,
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"transport-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"\n{report['host']['cpu_model']}, {os.cpu_count()} CPUs; python {report['versions']['python']}, "
          f"torch {torch.__version__}, grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}")
    if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
        print(f"warning: host was busy (1-min load {load_before:.1f} -> {load_after:.1f}); numbers are skewed")
    print(f"wrote {path} ({wall:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
