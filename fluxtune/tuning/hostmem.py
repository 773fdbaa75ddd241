"""Page-locked host memory for streamed weights, allocated at the speed of the host.

torch's pinned allocator rounds every request up to a power of two (a 38 MB fp8 weight takes 64 MB)
and pins each one on its own: with cudaHostAlloc on one thread that ran at 1.2 GB/s on the H200's
host, 12 s of ``apply`` for an 8 GB profile. A :class:`HostArena` packs one block's tensors into a
single exact-size private anonymous mapping, advised for transparent huge pages (512x fewer page
faults), faults it in with one write per page and page-locks it with one ``cudaHostRegister``.
Both release the GIL, so arenas for different blocks build in parallel: 11.4 GB/s on the H200's
host, against 1.2 GB/s for torch's default pinned allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import weakref
from pathlib import Path

import torch

ALIGN = 4096
"""Every tensor starts on its own page: DMA-friendly, and any dtype view of the slot is aligned."""
_HUGE = 2 << 20
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not only this thread's


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGN`: what one tensor takes in an arena."""
    return -(-nbytes // ALIGN) * ALIGN


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its strides are a permutation of a contiguous layout's."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@functools.cache
def _page_stride() -> int:
    """Bytes one write faults in: a huge page where transparent huge pages may back an madvise'd
    mapping, else a base page."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        mode = ""
    return _HUGE if "[always]" in mode or "[madvise]" in mode else mmap.PAGESIZE


def fault_in(ptr: int, nbytes: int) -> None:
    # Measured on the H200 host (4.2 GB, 16 threads): touching one byte per huge page, then
    # registering, took 0.09 s + 0.10 s; letting cudaHostRegister fault the pages itself took 1.1 s.
    # ctypes releases the GIL for each call, so arenas on other threads fault at the same time.
    stride = _page_stride()
    for off in range(0, nbytes, stride):
        ctypes.memset(ptr + off, 0, 1)


def _unregister(ptr: int, mapping: mmap.mmap) -> None:
    # ``mapping`` is unused: the finalizer holding it keeps the pages mapped until they are unlocked.
    with contextlib.suppress(Exception):  # interpreter shutdown: the driver unlocks at process exit anyway
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostArena:
    """One host buffer of ``nbytes`` that tensors are copied into with :meth:`take`.

    With ``pin=True`` (a CUDA machine) the buffer is page-locked, so copies from it to the GPU are
    asynchronous DMA; :meth:`close` (or garbage collection) unlocks it. The tensors taken stay valid
    after ``close``, as ordinary host memory.
    """

    def __init__(self, nbytes: int, *, pin: bool, device: torch.device | None = None) -> None:
        self.nbytes, self.used = nbytes, 0
        size = -(-max(nbytes, 1) // _HUGE) * _HUGE + _HUGE  # room to start on a huge-page boundary
        self._mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(self._mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            self._mapping.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(self._mapping, dtype=torch.uint8)
        start = -whole.data_ptr() % _HUGE
        self.buffer = whole[start:start + nbytes]
        self.pinned = False
        self._finalizer: weakref.finalize | None = None
        if pin and nbytes:
            fault_in(self.buffer.data_ptr(), nbytes)
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)  # this thread's context is the pipeline's device
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes, _REGISTER_PORTABLE)
            self.pinned = int(err) == 0
            if self.pinned:
                self._finalizer = weakref.finalize(self, _unregister, self.buffer.data_ptr(), self._mapping)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A copy of plain tensor ``like`` in the arena, with its dtype, shape and (dense) strides."""
        n = like.numel() * like.element_size()
        if self.used + n > self.nbytes:
            raise ValueError(f"HostArena: {n} more bytes do not fit ({self.used} of {self.nbytes} used)")
        slot = self.buffer[self.used:self.used + n].view(like.dtype)
        self.used += aligned(n)
        if like.is_contiguous() or not _dense(like):
            out = slot.view(like.shape)
        else:  # keep a transposed weight transposed: kernels may rely on its layout
            out = slot.as_strided(like.shape, like.stride())
        # From the GPU into locked memory: an async DMA, ordered before the caller's synchronize.
        out.copy_(like, non_blocking=self.pinned and like.device.type == "cuda")
        return out

    def close(self) -> None:
        """Unlock the pages (idempotent); taken tensors remain readable host memory."""
        if self._finalizer is not None:
            self._finalizer()
            self.pinned = False
