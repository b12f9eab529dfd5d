"""All-to-all at the sizes Ulysses sends, alone on the device: what the exchange costs without compute or rank
skew around it, on NCCL and on copy engines (with a check that the copy-engine exchange delivers exactly what an
all-gather says it should), the raw peer-to-peer copies under it issued every way at hand, how fast each GPU runs
the same attention kernel (a slow GPU makes every rank wait), and what splitting that kernel by query block would
cost. A diagnostic for bench/gang.py (docs/perf-log.md, 2026-11-21); prints JSON lines from rank 0.

    python bench/diagnostics/alltoall.py --gpus 2            # starts its ranks with bench/ranks.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ranks import bind_to_driver, run_ranks  # noqa: E402


def timed_ms(fn, iterations: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def copy_engine_exchanges(args: argparse.Namespace, rank: int, world: int, tokens: int) -> None:
    """Ulysses' copy-engine exchange alone: q/k/v in (three sends, then their arrival) and the attention output
    back, with every rank in step (the exchange's flags make each wait for the slowest peer)."""
    from services.denoiser.gang.copy_engine import CopyEngineExchange, unavailable_reason
    from services.denoiser.gang.distributed import AxisGroup

    ulysses = AxisGroup(group=dist.group.WORLD, ranks=list(range(world)), index=rank)
    control = dist.new_group(backend="gloo")
    reason = unavailable_reason(ulysses, control)
    if reason:
        if rank == 0:
            print(json.dumps({"copy_engine": f"unavailable: {reason}"}), flush=True)
        return
    heads = args.heads
    torch.manual_seed(rank)
    x = torch.randn(1, tokens, args.width, device="cuda", dtype=torch.bfloat16)
    out = torch.randn(1, world * tokens, heads // world, args.width // heads, device="cuda", dtype=torch.bfloat16)
    exchange = CopyEngineExchange(ulysses)

    def inputs():
        exchange.start()
        arrivals = [exchange.send(x, kind, heads) for kind in ("v", "q", "k")]
        received = [a.wait() for a in arrivals]
        exchange.inputs_read()
        exchange.output_read()
        return received

    def output():
        exchange.start()
        exchange.inputs_read()
        received = exchange.heads_to_tokens(out)
        exchange.output_read()
        return received

    def last_input():
        exchange.start()
        received = exchange.send(x, "k", heads).wait()
        exchange.inputs_read()
        exchange.output_read()
        return received

    row = {"exchange": "copy-engine"}
    for name, fn in (("qkv_ms", inputs), ("one_input_ms", last_input), ("output_ms", output)):
        row[name] = round(timed_ms(fn, args.iterations), 3)
    check = inputs()[2]
    expected = torch.cat(_gathered(x, world), dim=1)
    expected = expected.view(1, world * tokens, world, -1)[:, :, rank]
    row["exact"] = bool(torch.equal(check.flatten(2), expected))
    outs = _gathered(out, world)                              # every rank's [B, U*s, h/U, d]
    expected = torch.cat([o[:, rank * tokens:(rank + 1) * tokens] for o in outs], dim=2)
    row["exact"] &= bool(torch.equal(output(), expected))
    if rank == 0:
        print(json.dumps(row), flush=True)


def raw_copies(args: argparse.Namespace, rank: int, world: int, tokens: int) -> None:
    """The transfers under the copy-engine exchange, one share (14.5 MB at 720p) to each peer, every rank at once,
    each way of issuing them timed alone: one peer; every peer on one stream; on a stream each (do the copy engines
    run them at once?); each share split over several streams; pulled by the receiver instead of pushed; and
    written by copy kernels on the SMs. Microseconds per round of every rank's copies."""
    import torch.distributed._symmetric_memory as symm_mem

    from services.denoiser.gang.copy_engine import _Driver, _rendezvous

    share = tokens * args.width // world * 2                    # bytes per peer per tensor
    total = share * world
    buffer = symm_mem.empty(total, dtype=torch.uint8, device=torch.device("cuda", rank))
    handle = _rendezvous(buffer, dist.group.WORLD)
    peers_views = [handle.get_buffer(r, (total,), torch.uint8) for r in range(world)]
    source = torch.randint(0, 255, (total,), dtype=torch.uint8, device="cuda")
    calls = _Driver()
    peers = [(rank + step) % world for step in range(1, world)]
    streams = [torch.cuda.Stream() for _ in range(4 * world)]

    def destination(peer: int) -> torch.Tensor:       # my slot in the peer's buffer
        return peers_views[peer][rank * share:(rank + 1) * share]

    def origin(peer: int) -> torch.Tensor:            # what I send to the peer
        return source[peer * share:(peer + 1) * share]

    def copy(stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        calls.copy_2d(stream.cuda_stream, dst.data_ptr(), dst.numel(), src.data_ptr(), src.numel(), src.numel(), 1)

    def fan_out(jobs) -> None:
        """jobs: (stream index, fn(stream)); every stream after the current one, and the current after them."""
        current = torch.cuda.current_stream()
        queued = torch.cuda.Event()
        queued.record(current)
        used = set()
        for index, fn in jobs:
            stream = streams[index]
            if index not in used:
                stream.wait_event(queued)
                used.add(index)
            with torch.cuda.stream(stream):
                fn(stream)
        for index in used:
            done = torch.cuda.Event()
            done.record(streams[index])
            current.wait_event(done)

    def one_peer():
        fan_out([(0, lambda s: copy(s, destination(peers[0]), origin(peers[0])))])

    def peers_one_stream():
        fan_out([(0, lambda s, p=p: copy(s, destination(p), origin(p))) for p in peers])

    def peers_streams():
        fan_out([(i, lambda s, p=p: copy(s, destination(p), origin(p))) for i, p in enumerate(peers)])

    def peers_split(parts: int = 4):
        jobs = []
        for i, p in enumerate(peers):
            dst, src = destination(p).chunk(parts), origin(p).chunk(parts)
            for j in range(parts):
                jobs.append((i * parts + j, lambda s, d=dst[j], o=src[j]: copy(s, d, o)))
        fan_out(jobs)

    def pulled():
        # I read my share from each peer's source region (the peer's buffer doubles as its send buffer here).
        fan_out([(i, lambda s, p=p: copy(s, buffer[p * share:(p + 1) * share],
                                          peers_views[p][rank * share:(rank + 1) * share]))
                 for i, p in enumerate(peers)])

    def kernels_one_stream():
        for p in peers:
            destination(p).copy_(origin(p))

    def kernels_streams():
        fan_out([(i, lambda s, p=p: destination(p).copy_(origin(p))) for i, p in enumerate(peers)])

    row = {"copies": "raw", "share_mib": round(share / 2**20, 2), "peers": len(peers)}
    for name, fn in (("one_peer", one_peer), ("peers_one_stream", peers_one_stream), ("peers_streams", peers_streams),
                     ("peers_split4", peers_split), ("pulled", pulled),
                     ("kernels_one_stream", kernels_one_stream), ("kernels_streams", kernels_streams)):
        try:
            row[f"{name}_us"] = round(timed_ms(fn, args.iterations) * 1000, 1)
        except Exception as error:                              # reported, and the other ways still timed
            row[f"{name}_us"] = f"{type(error).__name__}: {error}"[:200]
            torch.cuda.synchronize()
    every = [None] * world
    dist.all_gather_object(every, row)
    if rank == 0:
        print(json.dumps({"raw_copies_per_rank": every}), flush=True)


def _gathered(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x)
    return pieces


def worker(args: argparse.Namespace) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    tokens = args.tokens // world                      # this rank's share of the sequence
    for tensors in (3, 1):                             # q/k/v in, attention output back
        numel = tensors * tokens * args.width
        send = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        received = torch.empty_like(send)
        ms = timed_ms(lambda s=send, r=received: dist.all_to_all_single(r, s), args.iterations)
        sent_bytes = numel * 2 * (world - 1) / world
        if rank == 0:
            print(json.dumps({"world": world, "tensors": tensors, "mib_per_rank": round(numel * 2 / 2**20, 1),
                              "ms": round(ms, 3), "gb_per_s_out": round(sent_bytes / ms / 1e6, 1)}), flush=True)
    copy_engine_exchanges(args, rank, world, tokens)
    raw_copies(args, rank, world, tokens)
    # The same attention call on every GPU, timed on its own: differences here become waits in the gang.
    heads = args.heads // world
    q = torch.randn(1, heads, args.tokens, 128, device="cuda", dtype=torch.bfloat16)
    ms = torch.tensor([timed_ms(lambda: F.scaled_dot_product_attention(q, q, q), 5)], device="cuda")
    every = [torch.empty_like(ms) for _ in range(world)]
    dist.all_gather(every, ms)
    if rank == 0:
        print(json.dumps({"attention_ms_per_gpu": [round(float(t), 3) for t in every], "heads": heads,
                          "tokens": args.tokens}), flush=True)
    attention_chunks(args, rank, world)
    dist.destroy_process_group()


def attention_chunks(args: argparse.Namespace, rank: int, world: int) -> None:
    """Ulysses' attention on one rank (h/U heads, every token) in one call against the queries split into U
    blocks (one per source rank), back to back or alternating over two streams: what pipelining the exchange with
    attention by query block would cost, and whether the split gives the same bits."""
    heads = args.heads // world
    q, k, v = (torch.randn(1, heads, args.tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    blocks = q.chunk(world, dim=2)
    streams = [torch.cuda.current_stream(), torch.cuda.Stream()]

    def whole():
        return F.scaled_dot_product_attention(q, k, v)

    def split():
        return [F.scaled_dot_product_attention(b, k, v) for b in blocks]

    def split_two_streams():
        current = streams[0]
        outs = []
        for i, b in enumerate(blocks):
            stream = streams[i % 2]
            if stream is not current:
                stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outs.append(F.scaled_dot_product_attention(b, k, v))
        current.wait_stream(streams[1])
        return outs

    row = {"rank": rank, "whole_ms": round(timed_ms(whole, 5), 3), "split_ms": round(timed_ms(split, 5), 3),
           "split_two_streams_ms": round(timed_ms(split_two_streams, 5), 3),
           "same_bits": bool(torch.equal(whole(), torch.cat(split(), dim=2)))}
    every = [None] * world
    dist.all_gather_object(every, row)
    if rank == 0:
        print(json.dumps({"attention_by_query_block": every}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="launch", choices=["launch", "worker"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=75600, help="sequence length (81x720x1280: 75600)")
    parser.add_argument("--width", type=int, default=1536, help="heads x head dim")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    if args.role == "worker":
        bind_to_driver()
        worker(args)
        return 0
    argv = [os.path.abspath(__file__), "worker", "--tokens", str(args.tokens), "--width", str(args.width),
            "--heads", str(args.heads), "--iterations", str(args.iterations)]
    run = run_ranks(argv, args.gpus)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
