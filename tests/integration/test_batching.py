"""Request batching through a real denoiser process (`diffmesh serve denoiser --max-batch 4 --batch-wait-ms 200`,
no mesh): three concurrent Denoise calls with their own seeds and prompts run as one batch (the denoiser's log
says so) and each returns, bit for bit, what the same request returns alone; a gang refuses --max-batch at start."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from diffmesh.v1 import denoiser_pb2
from services.common.tensors import TensorAssembler, iter_chunks
from tests.integration.test_gang import DenoiserProcess

PARAMS = dict(model="wan2.1-tiny", width=48, height=32, num_frames=5, num_inference_steps=3)


def messages(request_id: str, seed: int, guidance_scale: float):
    generator = torch.Generator().manual_seed(100 + seed)      # each request its own prompt
    yield denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(
        request_id=request_id, seed=seed, guidance_scale=guidance_scale, **PARAMS))
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        for chunk in iter_chunks(name, torch.randn(1, 11, 32, generator=generator)):
            yield denoiser_pb2.DenoiseRequest(tensor=chunk)


def denoise(stub, request_id: str, seed: int, guidance_scale: float) -> tuple[torch.Tensor, int]:
    assembler, steps = TensorAssembler(), 0
    for event in stub.Denoise(messages(request_id, seed, guidance_scale), timeout=120):
        if event.WhichOneof("item") == "progress":
            steps += 1
        else:
            assembler.add(event.tensor)
    return assembler.finish()["latents"], steps


@pytest.fixture(scope="module")
def batching_denoiser(model_dir, tmp_path_factory):
    process = DenoiserProcess(model_dir, tmp_path_factory.mktemp("batching"),
                              ["--max-batch", "4", "--batch-wait-ms", "200"])
    yield process
    process.stop()


def test_three_concurrent_requests_run_as_one_batch_each_equal_to_its_solo_run(batching_denoiser):
    requests = [("batch-a", 1, 5.0), ("batch-b", 2, 3.0), ("batch-c", 3, 6.0)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda r: denoise(batching_denoiser.stub, *r), requests))
    assert any("denoising a batch of 3 requests" in line and all(r[0] in line for r in requests)
               for line in batching_denoiser.log), "".join(batching_denoiser.log[-20:])
    for (request_id, seed, scale), (latents, steps) in zip(requests, together, strict=True):
        alone, alone_steps = denoise(batching_denoiser.stub, f"{request_id}-alone", seed, scale)
        assert steps == alone_steps == 3                       # each member its own progress events
        assert torch.equal(latents, alone), request_id


def test_a_gang_refuses_max_batch_at_start_with_one_clear_line(model_dir):
    result = subprocess.run([sys.executable, "-m", "diffmesh.cli", "serve", "denoiser", "--model", str(model_dir),
                             "--device", "cpu", "--devices", "2", "--max-batch", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "--max-batch 2 needs one device" in result.stderr + result.stdout
