"""The platform layer: everything that differs between Intel XPU, NVIDIA CUDA and CPU lives here.

Stage code asks for `current_platform()` and uses its device, distributed backend, synchronize and memory
calls; it never tests for a device kind itself. Selection: `--device` flag, else `DIFFMESH_DEVICE`, else the
first available of xpu, cuda, cpu.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

DEVICE_ENV = "DIFFMESH_DEVICE"
KINDS = ("xpu", "cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class Platform:
    kind: str                 # "xpu" | "cuda" | "cpu"
    dist_backend: str         # torch.distributed backend for tensor traffic
    # Environment variables that pin a process to its devices on this platform.
    visible_devices_env: str | None
    # The SDPA kernel that also returns log-sum-exps, which ring attention merges blocks with
    # (a name in services.denoiser.gang.attention.LSE_KERNELS).
    lse_attention: str = "math"
    # Defaults for the collective backend's own environment, set before a gang's process groups start; a value
    # the user set wins.
    collective_env: tuple[tuple[str, str], ...] = ()
    # Whether diffmesh's own Triton kernels (services/denoiser/rotary.py) run here. Off for XPU until someone has
    # run tests/unit/test_rotary.py on an Intel GPU; off on CPU, which Triton does not target.
    triton_kernels: bool = False
    # How Ulysses' exchanges travel (services/denoiser/gang/exchange.py): "collective" (the backend's all-to-all)
    # or "copy-engine" (CUDA copy engines over symmetric memory; needs every Ulysses rank on one host).
    ulysses_exchange: str = "collective"
    # The attention kernel `--attention-backend auto` falls back to here (services/common/attention.py): PyTorch's
    # own pick (on an H200 cuDNN's kernel, the fastest exact one PyTorch ships at every served shape:
    # bench/results/attention-cuda-*.json; on XPU, XPU's own SDPA path). `auto_attention` may put an optional,
    # faster kernel before it.
    attention: str = "native"

    def device(self, index: int | None = None) -> torch.device:
        if self.kind == "cpu" or index is None:
            return torch.device(self.kind)
        return torch.device(self.kind, index)

    def device_count(self) -> int:
        if self.kind == "cpu":
            return 1
        return _accelerator_module(self.kind).device_count()

    def set_device(self, index: int) -> None:
        if self.kind != "cpu":
            _accelerator_module(self.kind).set_device(index)

    def synchronize(self) -> None:
        if self.kind != "cpu":
            _accelerator_module(self.kind).synchronize()

    def memory_allocated(self) -> int:
        """Bytes held by tensors on the current device (0 on CPU, where torch keeps no such count)."""
        if self.kind == "cpu":
            return 0
        return int(_accelerator_module(self.kind).memory_allocated())

    def max_memory_allocated(self) -> int:
        if self.kind == "cpu":
            return 0
        return int(_accelerator_module(self.kind).max_memory_allocated())

    def memory_in_use(self) -> tuple[int, int]:
        """(bytes in use, peak bytes) of the memory this process computes in, for metrics: on an accelerator its
        allocator's tensor bytes on the current device; on CPU, where that memory is the host's and torch keeps no
        count, the process's resident set and its peak (Linux /proc and getrusage; 0 where neither exists)."""
        if self.kind != "cpu":
            return self.memory_allocated(), self.max_memory_allocated()
        resident = _resident_bytes()
        return resident, max(resident, _peak_resident_bytes())

    def reset_peak_memory(self) -> None:
        if self.kind != "cpu":
            _accelerator_module(self.kind).reset_peak_memory_stats()

    def empty_cache(self) -> None:
        if self.kind != "cpu":
            _accelerator_module(self.kind).empty_cache()

    def device_name(self, index: int = 0) -> str:
        if self.kind == "cpu":
            return "cpu"
        return str(_accelerator_module(self.kind).get_device_name(index))

    def share_host(self, processes_per_host: int) -> None:
        """Several gang ranks on one host: on CPU each takes its share of the cores rather than all of them
        (accelerator ranks each own a device and need nothing here)."""
        if self.kind == "cpu" and processes_per_host > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_per_host))

    def apply_collective_env(self) -> None:
        for name, value in self.collective_env:
            os.environ.setdefault(name, value)

    def auto_attention(self, index: int = 0) -> tuple[str, ...]:
        """The attention choices `--attention-backend auto` tries in turn, the first one usable here winning (an
        optional kernel that is not installed is skipped). On CUDA devices of compute capability 9.x and 10.x
        (Hopper, Blackwell), FlashAttention 4 first: on an H200 it is the fastest exact kernel for long sequences
        (Wan 480p self-attention 9.55 ms against cuDNN's 11.49; a compiled Wan forward 458 ms against 512), and the
        `flash-attn-4` choice takes cuDNN's kernel for short ones (bench/results/attention-cuda-2026-12-02.json)."""
        if self.kind == "cuda" and not torch.version.hip and torch.cuda.get_device_capability(index)[0] in (9, 10):
            return ("flash-attn-4", self.attention)
        return (self.attention,)

    def float8_matmul_missing(self, index: int = 0) -> str | None:
        """Why this platform's device cannot run float8 matmuls with per-row scales (`--quantize fp8`), or None
        where it can: CUDA from compute capability 8.9 (Ada, Hopper, Blackwell), ROCm's MI300 and MI350, Intel XPU
        (the devices torchao's float8 inference supports)."""
        if self.kind == "cpu":
            return "the CPU has no float8 matmul kernel"
        if self.kind == "cuda":
            if torch.version.hip:
                arch = torch.cuda.get_device_properties(index).gcnArchName
                return None if arch.startswith(("gfx942", "gfx950")) else f"{arch} is not an MI300 or MI350"
            major, minor = torch.cuda.get_device_capability(index)
            if (major, minor) < (8, 9):
                return f"{self.device_name(index)} has compute capability {major}.{minor}, float8 needs 8.9 or later"
        return None

    def default_dtype(self) -> torch.dtype:
        """float32 on CPU (exact, and bf16 matmuls are slow there); bfloat16 on accelerators."""
        return torch.float32 if self.kind == "cpu" else torch.bfloat16

    def visible_devices(self, environ: Mapping[str, str] | None = None) -> list[str] | None:
        """The entries of this platform's affinity variable in `environ` (default: this process's), one per visible
        device; None where it is unset (every device visible) or the platform has none (CPU)."""
        if self.visible_devices_env is None:
            return None
        value = (os.environ if environ is None else environ).get(self.visible_devices_env)
        if value is None:
            return None
        return [entry.strip() for entry in value.split(",") if entry.strip()]

    def affinity_env(self, indices: Sequence[int], environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment that shows a child process only the devices at `indices` of those `environ` (default:
        this process's) shows. An index is a position in the visible set, as in torchrun and vLLM: under
        CUDA_VISIBLE_DEVICES=2,3, index 1 is GPU 3. The child numbers its devices 0.. in the order given, and a
        gang rank's LOCAL_RANK picks among them. ValueError, saying what to change, on a platform with no affinity
        variable (CPU: its processes all share the host) or for an index beyond the visible devices."""
        if self.visible_devices_env is None:
            raise ValueError(f"the {self.kind} platform has no devices to choose from: its processes share the host "
                             "(drop the device list)")
        visible = self.visible_devices(environ)
        count = len(visible) if visible is not None else self.device_count()
        beyond = [index for index in indices if not 0 <= index < count]
        if beyond:
            seen = f" ({self.visible_devices_env}={','.join(visible)})" if visible is not None else ""
            shown = f"0-{count - 1}" if count > 1 else ("0" if count else "none")
            raise ValueError(f"device {beyond[0]} is not visible: {count} {self.kind} device(s) are{seen}, "
                             f"indices {shown}")
        chosen = [visible[index] for index in indices] if visible is not None else [str(index) for index in indices]
        return {self.visible_devices_env: ",".join(chosen)}


PLATFORMS: dict[str, Platform] = {
    "xpu": Platform("xpu", "xccl", "ZE_AFFINITY_MASK", lse_attention="fused_overrideable"),
    "cuda": Platform("cuda", "nccl", "CUDA_VISIBLE_DEVICES", lse_attention="cuda", triton_kernels=True,
                     ulysses_exchange="copy-engine",
                     collective_env=(
                         # After a collective times out, PyTorch's NCCL watchdog waits four times this many ms for
                         # other ranks' debug dumps before it ends the process: 60 s by default, on top of
                         # --gang-timeout, while the request waits.
                         ("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "1000"),
                     )),
    "cpu": Platform("cpu", "gloo", None, lse_attention="flash_cpu"),
}


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_resident_bytes() -> int:
    try:
        import resource
    except ImportError:     # not POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux


def _accelerator_module(kind: str):
    return getattr(torch, kind)


def is_available(kind: str) -> bool:
    if kind == "cpu":
        return True
    module = getattr(torch, kind, None)
    return bool(module is not None and module.is_available())


def load_optional_extensions(kind: str) -> None:
    """Import vendor extras only if installed: PyTorch >= 2.8 has XPU + XCCL built in, so IPEX and
    oneccl_bind_pt are optional (both are end-of-life / superseded)."""
    if kind != "xpu":
        return
    for module in ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
            logger.info("loaded optional extension %s", module)


def accelerator_lost_to_fork() -> bool:
    """Whether this process was forked from one that had initialized an accelerator: PyTorch then refuses to use
    that accelerator here ("Cannot re-initialize CUDA in forked subprocess")."""
    return any(getattr(_accelerator_module(kind), "_is_in_bad_fork", lambda: False)()
               for kind in KINDS if kind != "cpu" and hasattr(torch, kind))


def select_platform(requested: str | None = None) -> Platform:
    """Pick the platform: explicit request, then $DIFFMESH_DEVICE, then the first available accelerator."""
    choice = (requested or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if choice in ("", "auto"):
        choice = next(kind for kind in KINDS if is_available(kind))
    if choice not in PLATFORMS:
        raise ValueError(f"unknown device {choice!r}: expected one of auto, {', '.join(KINDS)}")
    if not is_available(choice):
        raise RuntimeError(f"device {choice!r} was requested but torch reports it unavailable on this machine")
    load_optional_extensions(choice)
    return PLATFORMS[choice]


_current: Platform | None = None


def current_platform() -> Platform:
    """The process-wide platform, selected once (see `set_platform`)."""
    global _current
    if _current is None:
        _current = select_platform()
    return _current


def set_platform(requested: str | None) -> Platform:
    """Select the platform for this process, e.g. from a `--device` flag."""
    global _current
    _current = select_platform(requested)
    return _current
