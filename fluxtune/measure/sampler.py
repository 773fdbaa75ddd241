"""A background thread that samples the process's GPU memory (NVML) and host RSS (with its children) during a measurement."""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil

_SAMPLE_INTERVAL_S = 0.02


class Sampler:
    """Background thread sampling host RSS (and NVML process / device memory on a GPU) every ~20 ms."""

    def __init__(self, gpu_index: int | None, interval: float = _SAMPLE_INTERVAL_S) -> None:
        self.gpu_index = gpu_index
        self.interval = interval
        self.process = psutil.Process(os.getpid())
        self.rss_peak = 0
        self.nvml_peak: int | None = None
        self.device_peak: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fluxtune-memory-sampler", daemon=True)
        self._hw: Any = None
        if gpu_index is not None:
            try:
                from fluxtune import hardware

                self._hw = hardware
            except ImportError:  # pragma: no cover - hardware is part of the package
                self._hw = None

    def host_rss(self) -> int:
        """RSS of this process and its children (inductor's compile workers, a bench's worker): what the
        host must hold at this moment."""
        try:
            total = int(self.process.memory_info().rss)
        except psutil.Error:
            return 0
        try:
            children = self.process.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                total += int(child.memory_info().rss)
            except psutil.Error:  # it exited between the listing and the read
                continue
        return total

    def sample(self) -> None:
        rss = self.host_rss()
        nvml = device = None
        if self._hw is not None and self.gpu_index is not None:
            nvml = self._hw.process_memory_used(self.gpu_index)
            device = self._hw.device_memory_used(self.gpu_index)
        with self._lock:
            self.rss_peak = max(self.rss_peak, rss)
            if nvml is not None:
                self.nvml_peak = max(self.nvml_peak or 0, nvml)
            if device is not None:
                self.device_peak = max(self.device_peak or 0, device)

    def reset_device(self) -> None:
        """Start the GPU peaks afresh (before the timed runs); the host peak covers everything."""
        with self._lock:
            self.nvml_peak = self.device_peak = None
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sample()


def lifetime_peak_rss() -> int | None:
    """This process's peak RSS since it started (Linux ``VmHWM``; None elsewhere): what a one-candidate
    worker needed over loading, applying and running, not only during the timed runs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
