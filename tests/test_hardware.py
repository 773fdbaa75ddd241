"""fluxtune.hardware: detection on this machine, and the NVML code paths through a fake NVML."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from fluxtune import hardware
from fluxtune.errors import UnsupportedHardwareError
from fluxtune.hardware import HardwareInfo

H200 = HardwareInfo(
    gpu_index=0, gpu_name="NVIDIA H200", total_memory_bytes=150_754_820_096, compute_capability=(9, 0),
    driver="570.124.06", cuda_version="12.8", torch_version="2.13.0", host_ram_bytes=128 * 2**30, cpu_count=16,
)


_CACHED = (hardware._nvml, hardware._nvml_index)


def _torch_has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture
def clean_caches() -> Iterator[None]:
    """NVML state is cached per process; tests that fake it must not leak the fake."""
    # The originals, captured at import: fixtures may monkeypatch the module attributes meanwhile.
    for cached in _CACHED:
        cached.cache_clear()
    yield
    for cached in _CACHED:
        cached.cache_clear()


@pytest.mark.skipif(_torch_has_cuda(), reason="checks the CPU-only answer")
def test_detect_hardware_on_cpu_machine() -> None:
    info = hardware.detect_hardware()
    assert not info.has_cuda
    assert (info.gpu_index, info.gpu_name, info.total_memory_bytes, info.compute_capability, info.driver) == (
        None, None, None, None, None,
    )
    assert not info.supports_fp8 and not info.supports_fp8_rowwise
    assert info.host_ram_bytes > 0 and info.cpu_count >= 1
    assert info.torch_version
    assert "CPU only" in info.describe()
    # any index is fine without a GPU: there is nothing to be out of range of
    assert not hardware.detect_hardware(3).has_cuda


@pytest.mark.skipif(_torch_has_cuda(), reason="checks the CPU-only answer")
def test_memory_queries_without_nvml_answer_none() -> None:
    assert hardware.device_memory_used(0) is None
    assert hardware.process_memory_used(0) is None


def test_missing_pynvml_is_not_an_error(monkeypatch: pytest.MonkeyPatch, clean_caches: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert hardware._nvml() is None
    assert hardware.device_memory_used(0) is None


def test_fingerprint_is_yaml_and_json_safe() -> None:
    fp = H200.fingerprint()
    assert fp == {
        "name": "NVIDIA H200", "memory_bytes": 150_754_820_096, "compute_capability": "9.0",
        "driver": "570.124.06", "cuda": "12.8",
    }
    assert yaml.safe_load(yaml.safe_dump(fp)) == fp
    assert json.loads(json.dumps(fp)) == fp
    cpu = hardware.detect_hardware().fingerprint()
    assert yaml.safe_load(yaml.safe_dump(cpu)) == cpu


@pytest.mark.parametrize(
    ("cc", "fp8", "rowwise"), [((8, 0), False, False), ((8, 6), False, False), ((8, 9), True, False),
                               ((9, 0), True, True), ((10, 0), True, False), ((12, 0), True, False),
                               (None, False, False)],
)
def test_fp8_support_follows_compute_capability(cc: tuple[int, int] | None, fp8: bool, rowwise: bool) -> None:
    # Row-wise fp8 is Hopper's: on Blackwell it is not assumed until measured there (fluxtune.gpus).
    info = dataclasses.replace(H200, compute_capability=cc)
    assert (info.supports_fp8, info.supports_fp8_rowwise) == (fp8, rowwise)


def test_describe_gpu() -> None:
    line = H200.describe()
    assert "NVIDIA H200" in line and "SM 9.0" in line and "140.4 GiB" in line and "\n" not in line


def test_library_versions() -> None:
    versions = hardware.library_versions()
    assert versions["torch"] not in ("", "missing")
    assert versions["diffusers"].startswith("0.42")
    assert versions["python"].count(".") == 2
    assert set(versions) >= {"torch", "diffusers", "transformers", "torchao", "accelerate", "optuna", "pydantic",
                             "fluxtune"}


def test_import_is_light() -> None:
    code = "import sys, fluxtune.hardware, fluxtune.pipelines; print(sorted({'torch', 'diffusers', 'transformers', 'pynvml'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------ fake NVML + fake torch CUDA


class _FakeNVMLError(Exception):
    pass


def _fake_nvml(procs: list[Any]) -> SimpleNamespace:
    """Two GPUs in NVML (PCI order): an A100 on bus 0x10 and an H200 on bus 0x20."""
    gpus = [
        {"name": "NVIDIA A100-SXM4-80GB", "total": 80 * 2**30, "used": 1 * 2**30, "cc": (8, 0), "bus": 0x10},
        {"name": "NVIDIA H200", "total": 141 * 2**30, "used": 5 * 2**30, "cc": (9, 0), "bus": 0x20},
    ]
    return SimpleNamespace(
        NVMLError=_FakeNVMLError,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(domain=0, bus=h["bus"], device=0),
        nvmlDeviceGetName=lambda h: h["name"].encode(),  # old pynvml returns bytes
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h["total"], used=h["used"]),
        nvmlDeviceGetCudaComputeCapability=lambda h: h["cc"],
        nvmlSystemGetDriverVersion=lambda: "570.124.06",
        nvmlDeviceGetComputeRunningProcesses=lambda h: procs if h["name"] == "NVIDIA H200" else [],
    )


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, clean_caches: None) -> list[Any]:
    """Pretend torch sees one GPU (as with CUDA_VISIBLE_DEVICES=1): torch index 0 is NVML index 1."""
    import torch

    procs: list[Any] = []
    nvml = _fake_nvml(procs)
    props = SimpleNamespace(name="torch-name", total_memory=140 * 2**30, major=9, minor=0,
                            pci_domain_id=0, pci_bus_id=0x20, pci_device_id=0)
    monkeypatch.setattr(hardware, "_nvml", lambda: nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    return procs


def test_detect_hardware_maps_torch_index_to_nvml_by_pci(fake_gpu: list[Any]) -> None:
    info = hardware.detect_hardware(0)
    assert info.has_cuda and info.gpu_index == 0
    assert info.gpu_name == "NVIDIA H200"  # NVML index 1, found through the PCI bus id, not index 0
    assert info.total_memory_bytes == 141 * 2**30
    assert info.compute_capability == (9, 0) and info.supports_fp8_rowwise
    assert info.driver == "570.124.06"
    assert hardware.device_memory_used(0) == 5 * 2**30


def test_detect_hardware_rejects_invisible_index(fake_gpu: list[Any]) -> None:
    with pytest.raises(UnsupportedHardwareError, match=r"gpu_index=1 .* use 0\.\.0"):
        hardware.detect_hardware(1)


def test_detect_hardware_falls_back_to_torch_without_nvml(fake_gpu: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_nvml", lambda: None)
    info = hardware.detect_hardware(0)
    assert (info.gpu_name, info.total_memory_bytes, info.compute_capability, info.driver) == (
        "torch-name", 140 * 2**30, (9, 0), None,
    )


def test_process_memory_used_counts_self_and_children(fake_gpu: list[Any]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fake_gpu += [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=1000),
            SimpleNamespace(pid=child.pid, usedGpuMemory=300),
            SimpleNamespace(pid=999_999_999, usedGpuMemory=5000),  # someone else
        ]
        assert hardware.process_memory_used(0) == 1300
        assert hardware.process_memory_used(0, pid=child.pid) == 300
    finally:
        child.kill()
        child.wait()


def test_process_memory_used_none_when_pids_do_not_match(fake_gpu: list[Any]) -> None:
    # In a container NVML lists host PIDs: nothing matches, and 0 would be a lie.
    fake_gpu.append(SimpleNamespace(pid=999_999_999, usedGpuMemory=5000))
    assert hardware.process_memory_used(0) is None
    fake_gpu[:] = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]  # driver cannot tell
    assert hardware.process_memory_used(0) is None


@pytest.mark.gpu
def test_detect_hardware_on_gpu() -> None:
    import torch

    info = hardware.detect_hardware()
    assert info.has_cuda and info.gpu_name
    assert info.total_memory_bytes is not None and info.total_memory_bytes > 2**30
    assert info.compute_capability == torch.cuda.get_device_capability(0)
    assert info.driver  # NVML answers on the lent machines
    torch.ones(1, device="cuda")  # make sure this process has a context
    used = hardware.process_memory_used(0)
    assert used is None or used > 0
    device_used = hardware.device_memory_used(0)
    assert device_used is not None and device_used > 0
