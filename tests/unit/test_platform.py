"""Tests for services.common.platform: choosing xpu / cuda / cpu and what each implies."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from services.common import platform
from services.common.platform import (
    DEVICE_ENV,
    PLATFORMS,
    current_platform,
    load_optional_extensions,
    select_platform,
    set_platform,
)

OPTIONAL_EXTENSIONS = ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """Each test starts with no selected platform and no DIFFMESH_DEVICE; the global is restored after."""
    saved = platform._current
    monkeypatch.setattr(platform, "_current", None)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    yield
    platform._current = saved


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)


@pytest.fixture
def extensions_absent(monkeypatch):
    """Make IPEX and oneCCL bindings look uninstalled, whatever this machine has."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in OPTIONAL_EXTENSIONS:
            return None
        return real_find_spec(name, *args, **kwargs)

    imported = []
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: imported.append(name))
    return imported


def test_cpu_uses_gloo_and_cpu_device():
    chosen = select_platform("cpu")
    assert chosen.kind == "cpu"
    assert chosen.dist_backend == "gloo"
    assert chosen.visible_devices_env is None
    assert chosen.device() == torch.device("cpu")
    assert chosen.device(3) == torch.device("cpu")  # cpu ignores an index
    assert chosen.device_count() == 1
    assert chosen.memory_allocated() == 0 and chosen.max_memory_allocated() == 0
    assert chosen.default_dtype() == torch.float32


def test_cpu_request_is_case_and_space_insensitive():
    assert select_platform("  CPU ").kind == "cpu"


def test_explicit_cuda_when_unavailable_raises_clear_runtime_error(no_accelerators):
    with pytest.raises(RuntimeError) as info:
        select_platform("cuda")
    message = str(info.value)
    assert "'cuda'" in message
    assert "unavailable" in message


def test_explicit_xpu_when_unavailable_raises_runtime_error(no_accelerators):
    with pytest.raises(RuntimeError, match="'xpu'.*unavailable"):
        select_platform("xpu")


def test_unknown_device_name_raises_value_error():
    with pytest.raises(ValueError) as info:
        select_platform("tpu")
    message = str(info.value)
    assert "'tpu'" in message
    for kind in ("auto", "xpu", "cuda", "cpu"):
        assert kind in message


def test_device_env_is_honoured(monkeypatch, no_accelerators):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert select_platform().kind == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="'cuda'"):
        select_platform()
    monkeypatch.setenv(DEVICE_ENV, "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        select_platform()


def test_explicit_request_beats_device_env(monkeypatch, no_accelerators):
    monkeypatch.setenv(DEVICE_ENV, "bogus")
    assert select_platform("cpu").kind == "cpu"


def test_device_env_auto_selects_automatically(monkeypatch, no_accelerators):
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert select_platform().kind == "cpu"


def test_auto_falls_back_to_cpu_without_accelerators(no_accelerators):
    assert select_platform().kind == "cpu"
    assert select_platform("auto").kind == "cpu"


@pytest.mark.skipif(not hasattr(torch, "xpu"), reason="this torch build has no torch.xpu module")
def test_auto_prefers_xpu_when_available_even_if_cuda_is_too(monkeypatch, extensions_absent):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # xpu must still win
    chosen = select_platform()
    assert chosen.kind == "xpu"
    assert chosen.dist_backend == "xccl"
    assert chosen.visible_devices_env == "ZE_AFFINITY_MASK"
    assert chosen.device().type == "xpu"
    assert chosen.device(1) == torch.device("xpu", 1)
    assert chosen.default_dtype() == torch.bfloat16


@pytest.mark.skipif(not hasattr(torch, "xpu"), reason="this torch build has no torch.xpu module")
def test_auto_picks_xpu_when_cuda_unavailable(monkeypatch, extensions_absent):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_platform().kind == "xpu"


def test_auto_picks_cuda_when_only_cuda_available(monkeypatch, no_accelerators):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = select_platform()
    assert chosen.kind == "cuda"
    assert chosen.dist_backend == "nccl"
    assert chosen.visible_devices_env == "CUDA_VISIBLE_DEVICES"
    assert chosen.device(2) == torch.device("cuda", 2)
    assert chosen.default_dtype() == torch.bfloat16


def test_load_optional_extensions_tolerates_missing_ipex(extensions_absent):
    load_optional_extensions("xpu")
    assert extensions_absent == []  # nothing was imported


def test_load_optional_extensions_imports_them_when_installed(monkeypatch):
    imported = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: imported.append(name))
    load_optional_extensions("xpu")
    assert imported == list(OPTIONAL_EXTENSIONS)
    imported.clear()
    load_optional_extensions("cuda")  # only xpu has optional extensions
    load_optional_extensions("cpu")
    assert imported == []


def test_set_platform_changes_current_platform(monkeypatch, no_accelerators):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set_platform("cuda").kind == "cuda"
    assert current_platform().kind == "cuda"
    assert set_platform("cpu").kind == "cpu"
    assert current_platform() is platform.PLATFORMS["cpu"]


def test_current_platform_selects_once_and_caches(monkeypatch, no_accelerators):
    assert current_platform().kind == "cpu"
    # Once selected, later changes to availability or the env do not move the process to another device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert current_platform().kind == "cpu"


def test_failed_set_platform_keeps_previous_selection(no_accelerators):
    set_platform("cpu")
    with pytest.raises(RuntimeError):
        set_platform("cuda")
    assert current_platform().kind == "cpu"


def test_cuda_shortens_the_nccl_watchdogs_dump_wait_unless_the_user_set_it(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "-")     # so monkeypatch restores the original
    monkeypatch.delenv("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC")
    PLATFORMS["cuda"].apply_collective_env()
    assert os.environ["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"] == "1000"
    monkeypatch.setenv("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "15000")
    PLATFORMS["cuda"].apply_collective_env()
    assert os.environ["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"] == "15000"


def test_cpu_and_xpu_set_no_collective_environment(monkeypatch):
    before = dict(os.environ)
    PLATFORMS["cpu"].apply_collective_env()
    PLATFORMS["xpu"].apply_collective_env()
    assert dict(os.environ) == before


def test_triton_kernels_run_on_cuda_only():
    """XPU is left out until the rotary kernel's test has run on an Intel GPU."""
    assert [kind for kind, chosen in PLATFORMS.items() if chosen.triton_kernels] == ["cuda"]
