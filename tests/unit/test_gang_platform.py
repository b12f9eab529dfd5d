"""The gang takes its collective backend and attention kernel from the platform layer, with no device case of
its own: on XPU that is XCCL and the fused SDPA op. (Checked by faking the platform; no XPU run is made.)"""

from __future__ import annotations

import pytest
import torch

from services.common import platform
from services.common.platform import PLATFORMS
from services.denoiser.gang import distributed
from services.denoiser.gang.attention import LSE_KERNELS, _lse_flash_cpu, _lse_math
from services.denoiser.gang.layout import GangLayout


class Joined(Exception):
    pass


@pytest.mark.parametrize("kind,backend,kernel", [("xpu", "xccl", "fused_overrideable"), ("cuda", "nccl", "cuda"),
                                                 ("cpu", "gloo", "flash_cpu")])
def test_each_platform_names_its_backend_and_an_existing_lse_kernel(kind, backend, kernel):
    assert PLATFORMS[kind].dist_backend == backend
    assert PLATFORMS[kind].lse_attention == kernel
    assert kernel in LSE_KERNELS


def test_gang_on_xpu_initialises_xccl_on_its_local_device(monkeypatch):
    xpu = PLATFORMS["xpu"]
    calls = {}
    monkeypatch.setattr(platform, "_accelerator_module", lambda kind: type("FakeXpu", (), {
        "device_count": staticmethod(lambda: 4),
        "set_device": staticmethod(lambda index: calls.setdefault("set_device", index)),
    }))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    # The rendezvous store is torch's own TCP store (tested by the CPU gang runs); no store is reachable here.
    monkeypatch.setattr(distributed, "rendezvous_store", lambda rank, world_size, timeout: (None, None))

    def init_process_group(backend, rank, world_size, **options):
        calls.update(backend=backend, rank=rank, world_size=world_size, **options)
        raise Joined

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    with pytest.raises(Joined):
        distributed.Gang(GangLayout(ulysses=2, tp=2), xpu, rank=3, local_rank=3)
    assert calls["backend"] == "xccl"
    assert calls["set_device"] == 3
    assert calls["device_id"] == torch.device("xpu", 3)
    assert (calls["rank"], calls["world_size"]) == (3, 4)


def test_env_rank_reads_torch_distributed_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.env_rank()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "5")
    assert distributed.env_rank() == (5, 4, 5)       # LOCAL_RANK defaults to RANK
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_rank() == (5, 4, 1)


def test_cpu_lse_kernel_matches_the_reference_softmax():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for n in (5, 7, 7))
    out, lse = _lse_flash_cpu(q, k, v)
    expected_out, expected_lse = _lse_math(q, k, v)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_ulysses_uses_copy_engines_on_cuda_only():
    assert PLATFORMS["cuda"].ulysses_exchange == "copy-engine"
    assert PLATFORMS["xpu"].ulysses_exchange == "collective"
    assert PLATFORMS["cpu"].ulysses_exchange == "collective"


def test_exchange_env_overrides_the_platform_and_rejects_unknown_names(monkeypatch):
    from services.denoiser.gang.exchange import EXCHANGE_ENV, requested_exchange

    monkeypatch.delenv(EXCHANGE_ENV, raising=False)
    assert requested_exchange("copy-engine") == "copy-engine"
    monkeypatch.setenv(EXCHANGE_ENV, " Collective ")
    assert requested_exchange("copy-engine") == "collective"
    monkeypatch.setenv(EXCHANGE_ENV, "nvlink")
    with pytest.raises(ValueError, match=EXCHANGE_ENV):
        requested_exchange("collective")


def _gang_rank(rank: int, port: int, out_dir: str) -> None:
    import os

    from services.denoiser.gang.attention import CollectiveExchange
    from services.denoiser.gang.distributed import Gang
    from services.denoiser.gang.exchange import EXCHANGE_ENV, ulysses_exchange

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{EXCHANGE_ENV: "copy-engine"})
    gang = Gang(GangLayout(ulysses=2), PLATFORMS["cpu"], rank, 0)
    try:
        exchange = ulysses_exchange(gang)
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as out:
            out.write(type(exchange).__name__ if isinstance(exchange, CollectiveExchange) else "other")
    finally:
        gang.close()


def test_copy_engines_asked_for_where_they_cannot_run_fall_back_to_the_collective_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from services.denoiser.gang.launcher import free_port

    mp.start_processes(_gang_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"rank{rank}").read_text() for rank in range(2)] == ["CollectiveExchange"] * 2
