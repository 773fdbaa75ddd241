"""What machine are we on: GPU, driver, memory, library versions.

This is the only module that imports ``pynvml`` (nvidia-ml-py). Everything else receives a frozen
:class:`HardwareInfo` instead of looking the hardware up itself, so tests can pass a fake one.
``torch`` and ``pynvml`` are imported inside functions: importing this module stays instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass
from typing import Any

import psutil

from fluxtune.errors import UnsupportedHardwareError

__all__ = [
    "EMULATE_ENV",
    "HardwareInfo",
    "activate_emulation",
    "card_budget",
    "emulated",
    "emulation_note",
    "detect_hardware",
    "device_memory_used",
    "library_versions",
    "process_memory_used",
]

_GIB = 2**30

# Distribution names reported by library_versions(), in display order.
_LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "torchao",
    "accelerate",
    "optuna",
    "pydantic",
    "fluxtune",
)


@dataclass(frozen=True)
class HardwareInfo:
    """The machine a profile is tuned or applied on.

    GPU fields are ``None`` when torch in this process cannot use a CUDA GPU (CPU-only build,
    no GPU, or all GPUs hidden by ``CUDA_VISIBLE_DEVICES``).
    ``gpu_index`` is the torch device index (after ``CUDA_VISIBLE_DEVICES``), not the NVML index.
    """

    gpu_index: int | None
    gpu_name: str | None
    total_memory_bytes: int | None
    compute_capability: tuple[int, int] | None
    driver: str | None
    cuda_version: str | None
    torch_version: str
    host_ram_bytes: int
    cpu_count: int
    emulated_on: str | None = None
    """The real GPU's name when this describes a card emulated on it (``--emulate``), else None."""
    h2d_gbs: float | None = None
    """Host->device GB/s that streamed copies are paced to (emulation), None = as fast as the link goes."""

    @property
    def has_cuda(self) -> bool:
        """True when torch can run on a CUDA GPU here."""
        return self.gpu_index is not None

    @property
    def capability(self) -> str | None:
        """The GPU's capability class (ampere, ada, hopper, blackwell; see :mod:`fluxtune.gpus`), None on CPU
        or for a GPU older than Ampere."""
        from fluxtune.gpus import capability_class

        cc = self.compute_capability
        return capability_class(cc) if cc is not None and cc >= (8, 0) else None

    @property
    def can_compile(self) -> bool:
        """True when torch.compile can generate kernels here: the CPU needs a C++ compiler (always assumed),
        a CUDA GPU needs Triton, which pip's CUDA torch brings on Linux and most Windows installs lack."""
        return not self.has_cuda or triton_available()

    @property
    def supports_fp8(self) -> bool:
        """True on SM 8.9+ (Ada, Hopper, Blackwell): float8 matmuls (tensorwise scales)."""
        return self.compute_capability is not None and self.compute_capability >= (8, 9)

    @property
    def supports_fp8_rowwise(self) -> bool:
        """True on Hopper (SM 9.0): torchao's row-wise float8 scaling; not assumed on Blackwell (unmeasured)."""
        return self.capability == "hopper"

    def spec(self) -> Any | None:
        """This GPU's row in the GPU table (:class:`fluxtune.gpus.GpuSpec`), None when it is not listed."""
        from fluxtune.gpus import match_gpu

        return match_gpu(self.gpu_name, self.total_memory_bytes) if self.has_cuda else None

    @classmethod
    def of_card(cls, spec: Any, *, memory_fraction: float = 1.0, host_ram_bytes: int = 0,
                cpu_count: int = 0) -> HardwareInfo:
        """A machine with the GPU table's card ``spec`` (:class:`fluxtune.gpus.GpuSpec`), as detect_hardware
        would describe it there (``memory_fraction``: NVML reports a little less than the card's size)."""
        return cls(gpu_index=0, gpu_name=spec.nvml_names[0] if spec.nvml_names else spec.name,
                   total_memory_bytes=int(spec.memory_bytes * memory_fraction), compute_capability=spec.sm,
                   driver=None, cuda_version=None, torch_version="", host_ram_bytes=host_ram_bytes,
                   cpu_count=cpu_count)

    def without_gpu(self) -> HardwareInfo:
        """This machine as a CPU-only run sees it: a GPU nobody asked for is hidden, so only CPU knobs
        are offered (a search on CPU)."""
        from dataclasses import replace

        return replace(self, gpu_index=None, gpu_name=None, total_memory_bytes=None, compute_capability=None)

    def fingerprint(self) -> dict[str, object]:
        """The hardware identity stored next to measured numbers (JSON/YAML-safe plain types).

        Returns:
            ``{"name", "memory_bytes", "compute_capability" ("9.0"), "driver", "cuda"}`` about the
            GPU; values are ``None`` on a CPU-only machine.
        """
        cc = self.compute_capability
        out: dict[str, object] = {
            "name": self.gpu_name,
            "memory_bytes": self.total_memory_bytes,
            "compute_capability": f"{cc[0]}.{cc[1]}" if cc is not None else None,
            "driver": self.driver,
            "cuda": self.cuda_version,
        }
        if self.emulated_on is not None:
            out["emulated_on"] = self.emulated_on
            out["h2d_gbs"] = self.h2d_gbs
        return out

    def describe(self) -> str:
        """One human line, e.g. ``GPU 0: NVIDIA H200, 139.8 GiB, SM 9.0, driver 570.86, CUDA 12.8; ...``."""
        host = (
            f"torch {self.torch_version}, {self.cpu_count} CPUs, "
            f"{self.host_ram_bytes / _GIB:.1f} GiB host RAM"
        )
        if not self.has_cuda:
            return f"no CUDA GPU (CPU only); {host}"
        name = self.gpu_name or "unknown GPU"
        if self.emulated_on is not None:
            name += f" (emulated on {self.emulated_on})"
        parts = [f"GPU {self.gpu_index}: {name}"]
        if self.total_memory_bytes is not None:
            parts.append(f"{self.total_memory_bytes / _GIB:.1f} GiB")
        if self.compute_capability is not None:
            parts.append(f"SM {self.compute_capability[0]}.{self.compute_capability[1]}")
        if self.driver is not None:
            parts.append(f"driver {self.driver}")
        if self.cuda_version is not None:
            parts.append(f"CUDA {self.cuda_version}")
        return f"{', '.join(parts)}; {host}"


# --------------------------------------------------------------------------------------------- NVML


@functools.cache
def triton_available() -> bool:
    """Triton is importable (found, not imported: importing it costs a second)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@functools.cache
def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None when NVML cannot be used here.

    Initialised once per process and never shut down: measurement code polls NVML often and
    nvmlInit/nvmlShutdown pairs cost milliseconds each.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver library (CPU machine), driver/library mismatch, ...
        return None
    return pynvml


def _as_str(value: str | bytes) -> str:
    # Old pynvml releases return bytes, new ones str.
    return value.decode() if isinstance(value, bytes) else value


def _torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def _nvml_index(gpu_index: int) -> int | None:
    """Map a torch device index to the NVML index of the same physical GPU.

    torch indices follow CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER while NVML always enumerates
    every GPU in PCI order, so the two only agree by accident. Matching on the PCI address torch
    reports is exact; without torch CUDA we can only assume the indices agree.
    """
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return None
    pci: tuple[int, int, int] | None = None
    if _torch_cuda_available():
        import torch

        props = torch.cuda.get_device_properties(gpu_index)
        # pci_* are missing from the type stubs and from some builds (e.g. ROCm): stay defensive.
        fields = (getattr(props, "pci_domain_id", None), getattr(props, "pci_bus_id", None),
                  getattr(props, "pci_device_id", None))
        if all(isinstance(f, int) for f in fields):
            pci = (int(fields[0]), int(fields[1]), int(fields[2]))  # type: ignore[arg-type]
    if pci is not None:
        for i in range(count):
            try:
                info = nvml.nvmlDeviceGetPciInfo(nvml.nvmlDeviceGetHandleByIndex(i))
            except nvml.NVMLError:
                continue
            if (int(info.domain), int(info.bus), int(info.device)) == pci:
                return i
    return gpu_index if 0 <= gpu_index < count else None


def _nvml_handle(gpu_index: int) -> Any | None:
    nvml = _nvml()
    index = _nvml_index(gpu_index)
    if nvml is None or index is None:
        return None
    try:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError:
        return None


def _nvml_gpu_fields(gpu_index: int) -> dict[str, Any]:
    """Name, memory, compute capability and driver from NVML; {} when NVML cannot tell."""
    nvml = _nvml()
    handle = _nvml_handle(gpu_index)
    if nvml is None or handle is None:
        return {}
    fields: dict[str, Any] = {}
    # Each query may be unsupported on some GPUs (MIG slices, vGPU): take what answers.
    with contextlib.suppress(nvml.NVMLError):
        fields["gpu_name"] = _as_str(nvml.nvmlDeviceGetName(handle))
    with contextlib.suppress(nvml.NVMLError):
        fields["total_memory_bytes"] = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    with contextlib.suppress(nvml.NVMLError):
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        fields["compute_capability"] = (int(major), int(minor))
    with contextlib.suppress(nvml.NVMLError):
        fields["driver"] = _as_str(nvml.nvmlSystemGetDriverVersion())
    return fields


# ------------------------------------------------------------------------------------------ public


def detect_hardware(gpu_index: int = 0) -> HardwareInfo:
    """Describe this machine and the CUDA GPU torch would use as ``cuda:<gpu_index>``.

    NVML is asked first (name, memory, compute capability, driver); torch.cuda fills what NVML
    cannot say. On a machine without a usable CUDA GPU the GPU fields are None: this never fails
    because the NVIDIA driver or pynvml is missing. Note that asking torch initialises CUDA in
    this process (worker processes should be spawned, not forked, afterwards).

    Args:
        gpu_index: torch device index, i.e. counted after ``CUDA_VISIBLE_DEVICES``.

    Returns:
        A frozen :class:`HardwareInfo`.

    Raises:
        UnsupportedHardwareError: CUDA is available but ``gpu_index`` is not a visible device.
    """
    import torch

    host = functools.partial(
        HardwareInfo,
        torch_version=str(torch.__version__),
        cuda_version=torch.version.cuda,
        host_ram_bytes=int(psutil.virtual_memory().total),
        cpu_count=int(os.cpu_count() or 1),
    )
    # GPU fields describe what torch in this process can use; a GPU that NVML sees but torch
    # cannot (CPU-only wheel, CUDA_VISIBLE_DEVICES="") is useless for running a pipeline.
    if not _torch_cuda_available():
        return host(gpu_index=None, gpu_name=None, total_memory_bytes=None, compute_capability=None, driver=None)
    count = torch.cuda.device_count()
    if not 0 <= gpu_index < count:
        raise UnsupportedHardwareError(
            f"gpu_index={gpu_index} is not a visible CUDA device; use 0..{count - 1} "
            "(indices count after CUDA_VISIBLE_DEVICES)"
        )
    nvml_fields = _nvml_gpu_fields(gpu_index)
    props = torch.cuda.get_device_properties(gpu_index)
    real = host(
        gpu_index=gpu_index,
        gpu_name=nvml_fields.get("gpu_name", str(props.name)),
        total_memory_bytes=nvml_fields.get("total_memory_bytes", int(props.total_memory)),
        compute_capability=nvml_fields.get("compute_capability", (int(props.major), int(props.minor))),
        driver=nvml_fields.get("driver"),
    )
    card = os.environ.get(EMULATE_ENV)
    return emulated(real, card) if card else real


EMULATE_ENV = "FLUXTUNE_EMULATE"
"""Set (by ``--emulate`` or by hand) to a GPU table name: :func:`detect_hardware` then describes that card,
emulated on the real GPU, in this process and in the worker processes it starts."""


def emulated(real: HardwareInfo, card_name: str) -> HardwareInfo:
    """``real`` seen as the named card: its name, memory, compute capability and host->device rate.

    Only the memory budget, the capability class (which knobs may run) and the pace of fluxtune's streamed
    copies are emulated; compute speed, memory bandwidth and host RAM stay the real machine's.

    Raises:
        ProfileError: the name is not in the GPU table (the message lists the closest names).
        UnsupportedHardwareError: the card has more memory or a newer architecture than the real GPU, or
            there is no GPU to emulate it on.
    """
    from fluxtune.gpus import find_gpu

    spec = find_gpu(card_name, field="--emulate")
    if not real.has_cuda or real.compute_capability is None or real.total_memory_bytes is None:
        raise UnsupportedHardwareError(f"--emulate={card_name!r} needs a CUDA GPU to emulate it on; this machine has none")
    if spec.memory_bytes > real.total_memory_bytes:
        raise UnsupportedHardwareError(
            f"--emulate={card_name!r}: the {spec.name} has {spec.memory_gib:g} GiB, more than this "
            f"{real.gpu_name} ({real.total_memory_bytes / _GIB:.1f} GiB); emulate a card with less memory")
    if spec.sm > real.compute_capability:
        raise UnsupportedHardwareError(
            f"--emulate={card_name!r}: the {spec.name} is SM {spec.sm[0]}.{spec.sm[1]}, newer than this "
            f"{real.gpu_name} (SM {real.compute_capability[0]}.{real.compute_capability[1]}): its knobs cannot "
            "run here; emulate a card of this GPU's architecture or older")
    return dataclasses.replace(
        real, gpu_name=spec.nvml_names[0] if spec.nvml_names else spec.name, total_memory_bytes=spec.memory_bytes,
        compute_capability=spec.sm, emulated_on=real.gpu_name, h2d_gbs=spec.h2d_gbs)


def device_memory_used(gpu_index: int = 0) -> int | None:
    """Bytes in use on the whole GPU (all processes, plus the driver's reservation), from NVML.

    Args:
        gpu_index: torch device index.

    Returns:
        Used bytes, or None when NVML is unavailable or does not answer.
    """
    nvml = _nvml()
    handle = _nvml_handle(gpu_index)
    if nvml is None or handle is None:
        return None
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    except nvml.NVMLError:
        return None


def process_memory_used(gpu_index: int = 0, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to a process and its children (CUDA context included).

    Inside a container NVML often reports host PIDs, which never match ours: then the answer is
    None ("NVML cannot tell"), not 0, and callers should fall back to :func:`device_memory_used`.

    Args:
        gpu_index: torch device index.
        pid: process id; this process by default.

    Returns:
        Bytes used by the matching processes, or None when NVML is unavailable, no listed process
        matches, or the driver does not report per-process usage.
    """
    nvml = _nvml()
    handle = _nvml_handle(gpu_index)
    if nvml is None or handle is None:
        return None
    pid = os.getpid() if pid is None else pid
    pids = {pid}
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return None
    used = [p.usedGpuMemory for p in procs if p.pid in pids]
    # pynvml turns NVML_VALUE_NOT_AVAILABLE into None (e.g. under some vGPU / WDDM setups).
    if not used or any(u is None for u in used):
        return None
    return int(sum(used))


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that change speed or behaviour.

    Returns:
        ``{"python": ..., "torch": ..., "diffusers": ..., ..., "fluxtune": ...}``; ``"missing"``
        for a library that is not installed.
    """
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    if versions["fluxtune"] == "missing":
        # Running from a source checkout without `pip install -e`: the package still knows itself.
        version = getattr(importlib.import_module("fluxtune"), "__version__", None)
        if isinstance(version, str):
            versions["fluxtune"] = version
    return versions


def activate_emulation(card_name: str, gpu_index: int = 0) -> HardwareInfo:
    """Emulate a named card from now on, in this process and in the worker processes it starts.

    Checks the name and the real GPU first (nothing is set when that fails), then sets
    ``$FLUXTUNE_EMULATE`` so :func:`detect_hardware` describes the card everywhere.

    Returns:
        The emulated :class:`HardwareInfo`.

    Raises:
        ProfileError, UnsupportedHardwareError: as :func:`emulated`.
    """
    previous = os.environ.pop(EMULATE_ENV, None)
    try:
        hw = emulated(detect_hardware(gpu_index), card_name)
    except Exception:
        if previous is not None:
            os.environ[EMULATE_ENV] = previous
        raise
    os.environ[EMULATE_ENV] = card_name
    return hw


def card_budget(hw: HardwareInfo) -> int | None:
    """The budget a card's owner passes: ``NGB`` (N x 1e9 bytes) for a card sold as N GB (N GiB)."""
    spec = hw.spec()
    if spec is None:
        return None
    return int(spec.memory_gib * 1e9)


def emulation_note(hw: HardwareInfo) -> str | None:
    """What an emulated run does and does not emulate, for every output that comes from one; None if real."""
    if hw.emulated_on is None:
        return None
    spec = hw.spec()
    memory = f"{spec.memory_gib:g} GiB" if spec is not None else "its memory"
    return (f"EMULATED {hw.gpu_name} on {hw.emulated_on}: emulated are its memory ({memory}: the budget), its "
            f"capability class ({hw.capability}: only knobs that run on it) and its host->device rate "
            f"({hw.h2d_gbs:g} GB/s: fluxtune's streamed blocks, diffusers' group offload and accelerate's model "
            f"offload are paced); NOT emulated: compute speed and memory bandwidth (the {hw.emulated_on}'s, much "
            "faster), host RAM, sequential offload's copies, driver and OS behaviour. Use `fluxtune predict` for the "
            "card's latency.")


@functools.cache
def measure_h2d_gbs(gpu_index: int = 0, nbytes: int = 256 * 2**20) -> float:
    """Host->device GB/s from page-locked memory on GPU ``gpu_index``, measured (best of 3 copies; cached)."""
    import torch

    device = torch.device("cuda", gpu_index)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    with torch.cuda.device(device):
        host.to(device, non_blocking=True)  # warm-up: the first copy pays for setting up the transfer
        for _ in range(3):
            start.record()
            host.to(device, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


def probe(gpu_index: int = 0) -> dict[str, float]:
    """A short measured probe for a GPU the table does not list: host->device GB/s and bf16 matmul TFLOPS.

    Returns:
        ``{"h2d_gbs": ..., "bf16_tflops": ...}`` (measured here, about a second).
    """
    import torch

    device = torch.device("cuda", gpu_index)
    n = 4096
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel
        a @ b
    reps = 20
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    return {"h2d_gbs": round(measure_h2d_gbs(gpu_index), 1), "bf16_tflops": round(2 * n**3 / seconds / 1e12, 1)}
