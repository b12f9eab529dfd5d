"""A small gRPC client for the gateway: run a generation, follow its progress, collect its outputs."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import grpc
import torch

from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc


@dataclasses.dataclass
class GenerationResult:
    job_id: str
    seed: int
    media: list[tuple[str, bytes]]                     # (mime type, file bytes), one per output
    tensors: dict[str, torch.Tensor]                   # "latents" / "frames" when asked for
    elapsed_seconds: float


ProgressCallback = Callable[[gateway_pb2.GenerateEvent], None]


class GatewayClient:
    """`tls_ca`: a CA file to verify a TLS gateway against (`tls=True` alone: the system's roots); `api_key`: sent
    as `authorization: Bearer KEY` with every call."""

    def __init__(self, address: str = "127.0.0.1:50051", tls_ca: str | None = None, api_key: str | None = None,
                 tls: bool = False) -> None:
        self.address = address
        options = [("grpc.max_receive_message_length", 16 << 20)]
        if tls or tls_ca:
            root = pathlib.Path(tls_ca).read_bytes() if tls_ca else None
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def generate(
        self,
        request: gateway_pb2.GenerateRequest,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        on_accepted: Callable[[str, int], None] | None = None,
        on_preview: Callable[[gateway_pb2.PreviewImage], None] | None = None,
    ) -> GenerationResult:
        """Run one generation; raises grpc.RpcError with the gateway's status on failure. `on_accepted(job_id,
        seed)` runs once the gateway has the job (so a caller interrupted later can cancel it)."""
        # Imported here so a client that only needs stubs does not pull in the services package.
        from services.common.tensors import TensorAssembler

        assembler = TensorAssembler()
        media: dict[int, tuple[str, list[bytes]]] = {}
        job_id, seed, elapsed = "", 0, 0.0
        for event in self.stub.Generate(request, timeout=timeout, metadata=self.metadata):
            kind = event.WhichOneof("item")
            if kind == "accepted":
                job_id, seed = event.accepted.job_id, event.accepted.seed
                if on_accepted is not None:
                    on_accepted(job_id, seed)
            elif kind == "progress" and on_progress is not None:
                on_progress(event)
            elif kind == "preview" and on_preview is not None:      # with request.preview_every
                on_preview(event.preview)
            elif kind == "media":
                mime, pieces = media.setdefault(event.media.index, (event.media.mime_type, []))
                pieces.append(event.media.data)
            elif kind == "tensor":
                assembler.add(event.tensor)
            elif kind == "completed":
                elapsed = event.completed.elapsed_seconds
        outputs = [(mime, b"".join(pieces)) for _, (mime, pieces) in sorted(media.items())]
        return GenerationResult(job_id, seed, outputs, assembler.finish(), elapsed)

    def cancel_job(self, job_id: str, timeout: float = 10.0) -> gateway_pb2.Job:
        return self.stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=job_id), timeout=timeout,
                                   metadata=self.metadata)

    def list_models(self) -> list[str]:
        reply = self.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10, metadata=self.metadata)
        return [m.id for m in reply.models]

    def close(self) -> None:
        self.channel.close()
