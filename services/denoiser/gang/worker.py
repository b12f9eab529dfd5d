"""One rank of the gang, start to finish: device -> process groups -> load -> READY -> serve (the leader) or
follow (every other rank).

The worker owns the process's life. A broken gang cannot be mended in flight: its ranks are no longer in step and
one may still sit inside a collective. So the worker, not the engine or the executor, ends the process with a
non-zero code, for the launcher (or the pod's supervisor) to restart the gang whole: a follower once its leader
is gone or a request failed, the leader once a request found the gang broken and its client has been told.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal

from services.common import logs
from services.common.server import StartupError, run_server
from services.common.stage import StageSpec, port_file_writer, serve_engine, serve_metrics, setup_stage, stage_tls
from services.denoiser.compile import compile_from_args
from services.denoiser.gang.distributed import Gang, Ranks
from services.denoiser.gang.engine import gang_engine
from services.denoiser.gang.executor import GangExecutor
from services.denoiser.gang.flags import resolve_layout
from services.denoiser.gang.layout import LayoutError

logger = logging.getLogger(__name__)

# Time for the failed request's UNAVAILABLE to reach its client before the leader exits.
BROKEN_EXIT_DELAY_S = 1.0


def leave_stopping_to_the_leader(rank: int) -> None:
    """A follower ignores SIGINT and SIGTERM: the leader decides when the gang stops (after draining). A Ctrl-C in
    the terminal reaches every rank at once, and a follower leaving first would strand the leader inside a
    collective."""
    if rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


async def serve_gang_rank(spec: StageSpec, args: argparse.Namespace, rank: int, world_size: int,
                          local_rank: int) -> None:
    """Run this rank until the gang stops; `spec` is the stage the leader serves over gRPC."""
    platform, model, dtype = setup_stage(spec.name, args)
    logs.configure(spec.name, rank)
    leave_stopping_to_the_leader(rank)
    try:
        layout = resolve_layout(args, world_size)
        gang = await asyncio.to_thread(Gang, layout, platform, rank, local_rank,
                                       datetime.timedelta(seconds=args.gang_timeout))
        platform.share_host(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        engine = await asyncio.to_thread(gang_engine, model, platform, dtype, gang, compile_from_args(args),
                                         args.shard_weights)
    except (LayoutError, RuntimeError, OSError, ValueError) as error:
        raise StartupError(str(error)) from error
    await asyncio.to_thread(gang.barrier)      # READY: every rank loaded before the leader reports SERVING
    if rank == 0:
        await lead(spec, args, engine, gang)
    else:
        await follow(args, GangExecutor(engine, gang), local_rank)


async def lead(spec: StageSpec, args: argparse.Namespace, engine: object, gang: Ranks,
               executor_class: type = GangExecutor) -> None:
    """Serve the stage over gRPC until stopped, then release the other ranks; exit 1 once the gang breaks.
    `executor_class(engine, gang, on_broken=...)` is what the servicer drives (the decoder's gang brings its own)."""
    loop = asyncio.get_running_loop()
    broken = asyncio.Event()
    executor = executor_class(engine, gang, on_broken=lambda: loop.call_soon_threadsafe(broken.set))
    logger.info("gang of %d ready: %s", gang.world_size, gang.describe())
    serving = asyncio.ensure_future(serve_engine(spec, args, executor))
    watching = asyncio.ensure_future(broken.wait())
    try:
        await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
        if broken.is_set():
            await asyncio.sleep(BROKEN_EXIT_DELAY_S)
            logger.error("the gang is broken; exiting so that it restarts")
            # Not SystemExit: the gang can be neither released nor closed, and interpreter shutdown would wait on
            # any thread still inside a collective.
            os._exit(1)
        await serving
    finally:
        watching.cancel()
        serving.cancel()
        await asyncio.to_thread(executor.release)
        gang.close()


async def follow(args: argparse.Namespace, executor: GangExecutor, local_rank: int) -> None:
    """Run the leader's requests until it says stop; exit 1 if the gang breaks first."""
    try:
        await follow_leader(args, executor, local_rank)
    except Exception as error:
        # The leader is gone or a collective failed: this rank cannot rejoin a gang in flight.
        logger.error("gang rank %d leaving: the gang is broken (%s)", executor.gang.rank, error)
        raise SystemExit(1) from None
    executor.gang.close()


async def follow_leader(args: argparse.Namespace, executor: GangExecutor, local_rank: int) -> None:
    """The first worker on a host of its own (local rank 0: one pod per rank, or one host of a multi-host gang)
    also serves gRPC health on --port, SERVING while it follows, so its pod or host can be probed; it serves no
    Denoise. Workers beside the leader on one host do not: the leader holds the port."""
    if local_rank != 0:
        await asyncio.to_thread(executor.follow)
        return
    stop = asyncio.Event()
    # Its own metrics too: its device's memory, its steps' times.
    on_started = port_file_writer(args, serve_metrics(args))
    health = asyncio.ensure_future(run_server(
        services=[], host=args.host, port=args.port, grace_seconds=0, stop_event=stop, handle_signals=False,
        tls=stage_tls(args), on_started=on_started))
    try:
        await asyncio.to_thread(executor.follow)
    finally:
        stop.set()
        await health
