"""A component's safetensors checkpoint, read tensor by tensor into buffers we own.

diffusers and transformers open safetensors files memory-mapped: every page a tensor touches stays in
the process (RSS) until the whole file's tensors are gone, and the first touch happens at ``apply``,
deep inside quantization. Here the file is read with ``preadv`` straight into the destination buffer
(page-locked staging for the GPU, the final tensor on the CPU), so only what a profile keeps on the
host ever counts against the host, and the page cache stays the kernel's business.

The format is the documented one: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxtune.errors import PipelineError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

FUSED: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
"""Projections diffusers' ``fuse_projections`` builds by concatenating others along the output axis:
a fused model's checkpoint-less parameter is read as the concatenation of its parts."""

_MAX_READ = 1 << 30  # Linux reads at most ~2 GiB per call


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: file, absolute byte offset, length, dtype, shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _header(path: Path) -> dict[str, Entry]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PipelineError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            meta = json.loads(f.read(n))
        except ValueError as e:
            raise PipelineError(f"{path}: safetensors header is not JSON ({e})") from e
    base = 8 + n
    out: dict[str, Entry] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise PipelineError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which fluxtune cannot read")
        start, end = info["data_offsets"]
        out[name] = Entry(path, base + start, end - start, _DTYPES[info["dtype"]], tuple(info["shape"]))
    return out


class Checkpoint:
    """The tensors of one component directory (``diffusion_pytorch_model*.safetensors`` or
    ``model*.safetensors``, sharded or not), read on demand."""

    def __init__(self, directory: str | Path, variant: str | None = None) -> None:
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        # A variant's files ("model.fp16.safetensors", "...fp16-00001-of-00002...") sit beside the default ones.
        stems = {f: f.name.removesuffix(".safetensors") for f in files}
        if variant:
            files = [f for f in files if f".{variant}" in stems[f]]
        else:
            files = [f for f in files if "." not in stems[f]]
        if not files:
            raise PipelineError(
                f"{self.directory}: no .safetensors weights"
                + (f" for variant {variant!r}" if variant else "")
                + "; fluxtune.load reads safetensors written by save_pretrained (safe_serialization=True)"
            )
        self.entries: dict[str, Entry] = {}
        for f in files:
            self.entries.update(_header(f))
        self._fds: dict[Path, int] = {}

    def rename(self, fn: Callable[[str], str]) -> None:
        """Key the stored tensors by ``fn(stored name)``: the names the module's parameters have."""
        self.entries = {fn(k): e for k, e in self.entries.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.entries or self._parts(key) is not None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _parts(self, key: str) -> list[str] | None:
        module, _, leaf = key.rpartition(".")
        parent, _, proj = module.rpartition(".")
        parts = FUSED.get(proj)
        if parts is None:
            return None
        keys = [f"{parent}.{p}.{leaf}" if parent else f"{p}.{leaf}" for p in parts]
        return keys if all(k in self.entries for k in keys) else None

    def entries_for(self, key: str) -> list[Entry]:
        """The stored tensors ``key`` is made of: itself, or the parts of a fused projection."""
        if key in self.entries:
            return [self.entries[key]]
        parts = self._parts(key)
        if parts is None:
            raise PipelineError(f"{self.directory}: the checkpoint has no tensor {key!r}; was it saved from "
                                "another model class or configuration?")
        return [self.entries[k] for k in parts]

    def read_into(self, entry: Entry, out: torch.Tensor) -> None:
        """Read ``entry``'s bytes into ``out``, a contiguous CPU tensor of at least its size (any dtype).
        Releases the GIL while reading, so several threads read in parallel."""
        fd = self._fds.get(entry.path)
        if fd is None:
            fd = self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
        view = out.reshape(-1).view(torch.uint8).numpy().data.cast("B")[: entry.nbytes]
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:done + _MAX_READ]], entry.offset + done)
            if n <= 0:
                raise PipelineError(f"{entry.path}: file ends before tensor data at byte {entry.offset + done}")
            done += n

    def drop_cache(self) -> None:
        """Ask the kernel to drop these files from its page cache (a cold-read benchmark; no root needed)."""
        for path in {e.path for e in self.entries.values()}:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        fds = getattr(self, "_fds", {})  # __init__ may have failed before opening anything
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __del__(self) -> None:
        self.close()


def read_tensor(ckpt: Checkpoint, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One tensor (or a fused projection's concatenated parts) as a new CPU tensor in its stored dtype."""
    entries = ckpt.entries_for(key)
    pieces = []
    for e in entries:
        t = torch.empty(e.shape, dtype=e.dtype)
        ckpt.read_into(e, t)
        pieces.append(t)
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out.to(device)


def total_bytes(entries: Iterable[Entry]) -> int:
    return sum(e.nbytes for e in entries)
