"""`diffmesh serve denoiser --devices 2 --shard-weights`: each transformer block's weights sharded across the gang's
ranks (services/denoiser/gang/sharded_weights.py), through the real gRPC service, on the CPU (gloo).

A gather is a copy, so the sharded gang returns what the same gang unsharded does, bit for bit (Wan2.1 in a Ulysses
and a CFG-parallel gang, with a step-cached request too, and with --compile), and the one-device latents within the
gang tests' tolerance; Wan2.2 A14B's two experts are both sharded. FLUX.1
too, within the CPU GEMM's last bit: its tiny checkpoint's tensors sit at 24 mod 64 bytes where the gathered copies
are 64-byte aligned, and the GEMM rounds by alignment (tests/unit/test_sharded_weights.py shows the outputs equal
bit for bit once the unsharded weights are aligned alike). The leader logs every rank's resident bytes at start-up:
each holds half the blocks'.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys

import pytest
import torch

from diffmesh.v1 import denoiser_pb2
from tests.integration import test_gang, test_gang_wan_variants
from tests.integration.test_gang import LAYOUTS, REL_L2_TOLERANCE, REQUESTS, DenoiserProcess, denoise, relative_l2

# The gang tests' fixtures, under these names here: Wan's one-device latents, and the Wan variants' tiny dirs
# with theirs
wan_one_device, variants_one_device = test_gang.reference, test_gang_wan_variants.prepared

RESIDENT = re.compile(r"(?P<component>transformer(_2)?) sharded over 2 ranks: rank (?P<rank>\d) weights: "
                      r"(?P<resident>\d+) bytes resident of (?P<total>\d+) "
                      r"\(blocks (?P<blocks>\d+) of (?P<blocks_total>\d+)\)")
# dynamo's eager backend: --compile traced, without code generation (seconds on the CPU; tests/unit/test_compile.py)
EAGER_COMPILE = {"DIFFMESH_COMPILE_BACKEND": "eager"}


def serve(model_dir, tmp_path, flags: list[str], requests, env: dict | None = None) -> tuple[dict, str]:
    """Each request's latents from a gang started with `flags`, and the gang's log; `requests(stub)` runs them."""
    gang = DenoiserProcess(model_dir, tmp_path, flags, env=env)
    try:
        latents = requests(gang.stub)
    finally:
        assert gang.stop() == 0, "".join(gang.log[-30:])
    return latents, "".join(gang.log)


# First Block Cache skipping blocks: a skipped block is still called (diffusers' hook replaces its forward), so its
# gather runs on every rank whatever each CFG rank's branch decides, and the ranks stay in step.
CACHED = dict(REQUESTS["guided-45-tokens"], num_inference_steps=6,
              cache=denoiser_pb2.CacheConfig(method="first_block", threshold=0.5))


def wan_requests(stub) -> dict[str, torch.Tensor]:
    """The gang tests' requests, and a step-cached one."""
    return {name: denoise(stub, params)[0] for name, params in {**REQUESTS, "cached": CACHED}.items()}


@pytest.fixture(scope="module")
def unsharded(model_dir, tmp_path_factory):
    """The same gang without --shard-weights, per layout (started on first use)."""
    @functools.cache
    def run(layout: str) -> dict[str, torch.Tensor]:
        return serve(model_dir, tmp_path_factory.mktemp(layout), LAYOUTS[layout], wan_requests)[0]

    return run


def assert_each_rank_holds_half_the_blocks(log: str, components: tuple[str, ...] = ("transformer",)) -> None:
    found = {(m["component"], int(m["rank"])): {k: int(m[k]) for k in ("resident", "total", "blocks", "blocks_total")}
             for m in RESIDENT.finditer(log)}
    assert set(found) == {(component, rank) for component in components for rank in (0, 1)}, log[-3000:]
    for counts in found.values():
        # Half each, plus FSDP's padding of dimensions that do not divide by 2
        assert counts["blocks_total"] <= 2 * counts["blocks"] <= 1.1 * counts["blocks_total"]
        assert counts["total"] - counts["resident"] == counts["blocks_total"] - counts["blocks"]  # the rest: whole


# One layout through `serve denoiser --devices 2`, compiled and with a cached request: what sharding meets on the way
# (the gang's launcher, compiled blocks, cache hooks on FSDP's block class). CFG-2 and FLUX, sharded against
# unsharded, run in tests/unit/test_sharded_weights.py on real gloo ranks too.
def test_a_sharded_compiled_wan_gang_returns_the_unsharded_gangs_latents_bit_for_bit(model_dir, tmp_path,
                                                                                    wan_one_device, unsharded):
    flags = [*LAYOUTS["ulysses2"], "--shard-weights", "--compile"]
    latents, log = serve(model_dir, tmp_path, flags, wan_requests, env=EAGER_COMPILE)
    for name in latents:
        assert torch.equal(latents[name], unsharded("ulysses2")[name]), name
    for name in REQUESTS:
        error = relative_l2(latents[name], wan_one_device[name])
        assert error <= REL_L2_TOLERANCE, f"{name}: relative L2 error {error:.2e}"
    assert re.search(r"step cache first_block.*: skipped [1-9]\d* of", log), "the cached request skipped nothing"
    assert_each_rank_holds_half_the_blocks(log)
    assert "compiling WanTransformer3DModel's WanTransformerBlock blocks (eager" in log


def test_a_sharded_wan22_gang_shards_both_experts(variants_one_device, tmp_path):
    """Wan2.2 A14B's two experts, each loaded through the plan: both sharded, and the steps cross the boundary."""
    prepared = variants_one_device("wan2.2")
    requests = test_gang_wan_variants.REQUESTS["wan2.2"]

    def run(stub) -> dict[str, torch.Tensor]:
        return {name: test_gang_wan_variants.denoise(stub, name, request.params, prepared.tensors[name])[0]
                for name, request in requests.items()}

    latents, log = serve(prepared.model_dir, tmp_path, [*LAYOUTS["ulysses2"], "--shard-weights"], run)
    for name in requests:
        error = relative_l2(latents[name], prepared.reference[name])
        assert error <= REL_L2_TOLERANCE, f"wan2.2 {name}: relative L2 error {error:.2e}"
    assert_each_rank_holds_half_the_blocks(log, ("transformer", "transformer_2"))


def test_shard_weights_with_tensor_parallelism_fails_at_start_with_one_clear_line(model_dir):
    result = subprocess.run([sys.executable, "-m", "diffmesh.cli", "serve", "denoiser", "--model", str(model_dir),
                             "--device", "cpu", "--port", "0", "--devices", "2", "--tp", "2", "--shard-weights"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "--shard-weights with --tp 2: not available" in result.stderr
    assert "Traceback" not in result.stderr
