"""How fast weights reach page-locked host memory: fluxtune's arenas against torch's pinned allocator.

Run on a CUDA machine: ``python scripts/pinning_check.py [--gb 4] [--block-mb 160] [--out pinning.json]``.
It first checks that an arena is really page-locked (copies out of it are asynchronous and exact),
then moves the same GPU tensors (``--gb`` in blocks of ``--block-mb``, each block 8 tensors, like a
FLUX block) to host memory three ways, each on freshly allocated memory:

- ``torch default``: ``torch.empty(..., pin_memory=True)`` + copy per tensor (cudaHostAlloc);
- ``torch host_register``: the same with ``pinned_use_cuda_host_register`` on 16 threads;
- ``fluxtune arenas``: one :class:`~fluxtune.tuning.hostmem.HostArena` per block, on a thread pool.

Prints one JSON object (GB/s for each, and the machine's transparent-hugepage mode).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fluxtune.tuning.hostmem import HostArena, aligned, fault_in
from fluxtune.tuning.placement import parallel_host_pinning


def _thp() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def _sanity(dev: torch.device) -> dict[str, object]:
    src = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    arena = HostArena(aligned(src.nbytes), pin=True, device=dev)
    home = arena.take(src)
    torch.cuda.synchronize(dev)
    back = torch.empty_like(src)
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        back.copy_(home, non_blocking=True)
    side.synchronize()
    out: dict[str, object] = {"pinned": arena.pinned, "is_pinned": bool(home.is_pinned()), "exact": bool(torch.equal(back, src))}
    arena.close()
    out["unpinned_after_close"] = not home.is_pinned()
    return out


def _blocks(dev: torch.device, gb: float, block_mb: int) -> list[list[torch.Tensor]]:
    per = block_mb * 2**20 // 8
    n = max(1, int(gb * 2**30 // (block_mb * 2**20)))
    return [[torch.empty(per, dtype=torch.uint8, device=dev).random_(0, 255) for _ in range(8)] for _ in range(n)]


def _torch_pinned(blocks: list[list[torch.Tensor]]) -> float:
    torch._C._host_emptyCache()  # no cached pinned blocks from an earlier pass
    t0 = time.perf_counter()
    homes = []
    for block in blocks:
        for t in block:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t)
            homes.append(h)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _arenas(blocks: list[list[torch.Tensor]], dev: torch.device) -> tuple[float, bool]:
    def one(block: list[torch.Tensor]) -> HostArena:
        arena = HostArena(sum(aligned(t.nbytes) for t in block), pin=True, device=dev)
        for t in block:
            arena.take(t)
        torch.cuda.current_stream(dev).synchronize()
        return arena

    t0 = time.perf_counter()
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1, len(blocks))) as pool:
        arenas = list(pool.map(one, blocks))
    seconds = time.perf_counter() - t0
    ok = all(a.pinned for a in arenas)
    for a in arenas:
        a.close()
    return seconds, ok


def _phases(blocks: list[list[torch.Tensor]], dev: torch.device, workers: int) -> dict[str, float]:
    """Where an arena's time goes: map + advise, touching a byte per 4 KiB page, registering, copying;
    each phase for all blocks on ``workers`` threads (1: one after another)."""
    import ctypes
    import mmap

    sizes = [sum(aligned(t.nbytes) for t in b) for b in blocks]
    maps: list[mmap.mmap] = []
    ptrs: list[int] = []
    out: dict[str, float] = {}

    def run(name: str, fn: object) -> None:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, range(len(blocks))))  # type: ignore[arg-type]
        out[name] = round(time.perf_counter() - t0, 3)

    huge = 2 << 20
    t0 = time.perf_counter()
    for n in sizes:
        m = mmap.mmap(-1, n + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        maps.append(m)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        ptrs.append(base + (-base % huge))
    out["map"] = round(time.perf_counter() - t0, 3)

    def touch(i: int) -> None:
        fault_in(ptrs[i], sizes[i])

    def touch_all(i: int) -> None:
        ctypes.memset(ptrs[i], 0, sizes[i])

    def register(i: int) -> None:
        torch.cuda.set_device(dev)
        torch.cuda.cudart().cudaHostRegister(ptrs[i], sizes[i], 1)

    def copy(i: int) -> None:
        off = 0
        whole = torch.frombuffer(maps[i], dtype=torch.uint8)
        start = ptrs[i] - whole.data_ptr()
        base = whole[start:start + sizes[i]]
        for t in blocks[i]:
            base[off:off + t.nbytes].copy_(t, non_blocking=True)
            off += aligned(t.nbytes)
        torch.cuda.current_stream(dev).synchronize()

    run("fault", touch)
    run("memset", touch_all)
    run("register", register)
    run("copy", copy)
    for p in ptrs:
        torch.cuda.cudart().cudaHostUnregister(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--block-mb", type=int, default=160)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    res: dict[str, object] = {"thp": _thp(), "cpus": os.cpu_count(), "sanity": _sanity(dev)}
    blocks = _blocks(dev, a.gb, a.block_mb)
    total = sum(t.nbytes for b in blocks for t in b) / 1e9
    res["gb"] = round(total, 2)
    s, ok = _arenas(blocks, dev)
    res["fluxtune arenas"] = {"s": round(s, 3), "GB/s": round(total / s, 2), "all_pinned": ok}
    for workers in (16, 1):
        res[f"arena phases, {workers} thread(s)"] = _phases(blocks, dev, workers)
    s = _torch_pinned(blocks)
    res["torch default"] = {"s": round(s, 3), "GB/s": round(total / s, 2)}
    parallel_host_pinning()  # what placement sets for diffusers' group offload
    s = _torch_pinned(blocks)
    res["torch host_register"] = {"s": round(s, 3), "GB/s": round(total / s, 2)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
