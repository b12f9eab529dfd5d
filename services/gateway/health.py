"""The gateway's own gRPC health, from its stages': NOT_SERVING while any stage of a model has no replica serving.

Statuses, by health service name:
- "" and "diffmesh.v1.Gateway": SERVING while every served model has a SERVING replica of each of its stages.
- "diffmesh.v1.Gateway/<model>": the same, for one model.
- "liveness": SERVING while the process runs (until it drains): for a liveness probe, which must not restart a
  healthy gateway because a stage is down.

Read from the stage pools' health watches (services/gateway/stages.py), which hear a replica stop or return within
about half a second; this mirrors them every HEALTH_POLL_S, with no call of its own.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from services.gateway.pipeline import MeshPipeline

logger = logging.getLogger(__name__)

SERVICE_NAME = "diffmesh.v1.Gateway"
LIVENESS = "liveness"
HEALTH_POLL_S = 0.25
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def model_service_name(model: str) -> str:
    return f"{SERVICE_NAME}/{model}"


def model_down_stages(pipeline: MeshPipeline) -> dict[str, list[str]]:
    """For each served model, its stages with no replica serving now (empty: the model is served)."""
    return {name: [stage for stage, pool in route.pools.items() if not pool.serving_now()]
            for name, route in pipeline.routes.items()}


async def mirror_stage_health(pipeline: MeshPipeline, servicer: health.aio.HealthServicer) -> None:
    """Keep the gateway's health statuses current until cancelled (run_server's watch_health)."""
    await servicer.set(LIVENESS, SERVING)
    last: dict[str, int] = {}
    while True:
        try:
            down = model_down_stages(pipeline)
            statuses = {model_service_name(model): NOT_SERVING if stages else SERVING
                        for model, stages in down.items()}
            overall = SERVING if all(status == SERVING for status in statuses.values()) else NOT_SERVING
            statuses.update({"": overall, SERVICE_NAME: overall})
            for name, status in statuses.items():
                if last.get(name) != status:
                    await servicer.set(name, status)
            if last.get("") != overall:
                missing = {model: stages for model, stages in down.items() if stages}
                logger.info("gRPC health %s%s", health_pb2.HealthCheckResponse.ServingStatus.Name(overall),
                            f": no replica serving for {missing}" if missing else "")
            last = statuses
        except Exception:       # never let a bad read stop the mirror: the next tick tries again
            logger.exception("mirroring the stages' health failed")
        await asyncio.sleep(HEALTH_POLL_S)
