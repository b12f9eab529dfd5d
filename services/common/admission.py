"""The Admission service every stage serves: its AdmissionGate's size and load, so a gateway can size what it
sends (services/gateway/admission.py) instead of finding the limit by being refused."""

from __future__ import annotations

import grpc

from diffmesh.v1 import admission_pb2, admission_pb2_grpc
from services.common.server import AdmissionGate

SERVICE_NAME = "diffmesh.v1.Admission"


class AdmissionServicer(admission_pb2_grpc.AdmissionServicer):
    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate

    async def GetCapacity(self, request: admission_pb2.GetCapacityRequest, context: grpc.aio.ServicerContext):
        return admission_pb2.Capacity(concurrency=self.gate.concurrency, max_queue=self.gate.max_queue,
                                      in_flight=self.gate.in_flight)


def admission_service(servicer) -> list[tuple]:
    """run_server's service entry for a stage servicer's gate (none for a servicer without one)."""
    gate = getattr(servicer, "gate", None)
    if not isinstance(gate, AdmissionGate):
        return []
    return [(admission_pb2_grpc.add_AdmissionServicer_to_server, AdmissionServicer(gate), SERVICE_NAME)]
