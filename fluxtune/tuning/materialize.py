"""Weights made real where the profile puts them, one unit (a repeated block, or the rest) at a time.

Two kinds of work wait for placement, which knows where each unit goes:

* a component that :func:`fluxtune.load` built as a skeleton on the meta device, with the
  :class:`~fluxtune.loading.checkpoint.Checkpoint` its tensors are read from;
* the quantization of a component that will not stay whole on the GPU (streamed or offloaded): it
  runs on the GPU one unit at a time instead of on the CPU (18.6 s for FLUX.1-dev's transformer on
  the H200 host's CPU).

:meth:`Materializer.bring_all` walks the units in the caller's order: each unit's meta tensors are
read from the checkpoint through page-locked staging buffers (the next unit is read while this one is
copied and quantized), its real tensors are moved, a deferred quantization runs on it, and the
caller's ``after(unit)`` then leaves it there, moves it to the host, or copies it into a streaming
arena. At no point does a full bf16 copy of the component exist, on the host or on the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from fluxtune.tuning.hostmem import HostArena, aligned
from fluxtune.tuning.streaming import _assign, _inner, _moved, repeated_blocks

if TYPE_CHECKING:
    from fluxtune.knobs import Quantize
    from fluxtune.loading.checkpoint import Checkpoint, Entry

REST = ""
"""The unit of everything outside the repeated blocks (embeddings, norms, projections)."""


@dataclass
class WeightPlan:
    """What placement must still do to a component's weights."""

    source: Checkpoint | None = None
    """Meta tensors are read from here (a skeleton from :func:`fluxtune.load`)."""
    quantize: Quantize | None = None
    """Quantization deferred to placement, done on the execution device unit by unit."""


@dataclass
class _Tensor:
    sites: list[tuple[torch.nn.Module, str, str]]  # (module, attribute, checkpoint key): tied tensors have several
    buffer: bool

    def get(self) -> torch.Tensor:
        m, name, _ = self.sites[0]
        return (m._buffers if self.buffer else m._parameters)[name]  # type: ignore[return-value]

    def set_new(self, t: torch.Tensor) -> None:
        """Replace a meta tensor (a meta Parameter cannot take real data in place)."""
        param = None if self.buffer else torch.nn.Parameter(t, requires_grad=False)
        for m, name, _ in self.sites:
            if param is None:
                m._buffers[name] = t
            else:
                m._parameters[name] = param


@dataclass
class _Staged:
    """One unit's checkpoint bytes, read into a staging buffer (or straight into CPU tensors)."""

    pieces: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # id(tensor record) -> stored parts
    slot: int | None = None


class Materializer:
    """Brings one component's units onto a device (see the module docstring)."""

    def __init__(self, component: torch.nn.Module, plan: WeightPlan, device: torch.device, *,
                 on_cuda: bool, read_threads: int = 8) -> None:
        self.component, self.plan, self.device, self.on_cuda = component, plan, device, on_cuda
        blocks = repeated_blocks(component)
        self.blocks = dict(blocks)
        self.units: list[str] = [name for name, _ in blocks] + [REST]
        self.members: dict[str, list[_Tensor]] = {u: [] for u in self.units}
        records: dict[int, _Tensor] = {}
        for mname, m in component.named_modules(remove_duplicate=False):
            for buffer, table in ((False, m._parameters), (True, m._buffers)):
                for name, t in table.items():
                    if t is None or (buffer and name in m._non_persistent_buffers_set and not t.is_meta):
                        continue
                    key = f"{mname}.{name}" if mname else name
                    rec = records.get(id(t))
                    if rec is None:
                        rec = records[id(t)] = _Tensor([], buffer)
                        self.members[self._unit_of(key)].append(rec)
                    rec.sites.append((m, name, key))
        self.read_s = self.quantize_s = 0.0
        self.read_bytes = self.copied_bytes = 0
        self.quantized: list[str] = []
        self.excluded: list[str] = []
        self._pool = ThreadPoolExecutor(read_threads, thread_name_prefix="fluxtune-read")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fluxtune-stage")
        self._staging: list[HostArena] = []
        self._events: list[torch.cuda.Event | None] = []

    def _unit_of(self, key: str) -> str:
        for name in self.blocks:
            if key.startswith(name + "."):
                return name
        return REST

    def block(self, unit: str) -> torch.nn.Module | None:
        return self.blocks.get(unit)

    def expected_bytes(self, unit: str) -> int:
        """A unit's bytes once brought: quantized sizes for the layers the deferred quantization will
        convert (partial residency picks its resident blocks by these, before any weight is read)."""
        from fluxtune.memory.model import quantized_bytes
        from fluxtune.tuning.quantize import linear_filter, output_embedding

        q = self.plan.quantize
        converted: dict[int, float] = {}
        if q is not None:
            keep = linear_filter(q, [], output_embedding(self.component))
            root = self.blocks[unit] if unit != REST else self.component
            for fqn, m in root.named_modules(prefix=unit if unit != REST else ""):
                if unit == REST and self._unit_of(fqn + ".") != REST:
                    continue
                if isinstance(m, torch.nn.Linear) and keep(m, fqn):
                    converted[id(m.weight)] = quantized_bytes(m.weight.numel(), m.out_features, q)
        return int(sum(converted.get(id(t), t.numel() * t.element_size())
                       for t in (r.get() for r in self.members[unit])))

    # -- reading --------------------------------------------------------------------------------
    def _entries(self, rec: _Tensor) -> list[Entry]:
        assert self.plan.source is not None
        keys = [k for _, _, k in rec.sites]
        for key in keys:  # a tied tensor is stored under one of its names
            if key in self.plan.source:
                return self.plan.source.entries_for(key)
        return self.plan.source.entries_for(keys[0])  # raises, naming the key

    def _copyable(self, t: torch.Tensor) -> bool:
        """A plain dense host tensor bound for the GPU: copied through the pinned staging ring, since a
        pageable copy (a ``from_pretrained`` pipeline's memory-mapped weights) runs at a fraction of it."""
        return (self.device.type == "cuda" and not t.is_meta and t.device.type == "cpu"
                and _inner(t) is None and t.is_contiguous())

    def _to_stage(self, unit: str) -> list[_Tensor]:
        """A unit's tensors that go through staging: meta ones (read from the checkpoint) and host ones
        bound for the GPU."""
        out = []
        for r in self.members[unit]:
            t = r.get()
            if (t.is_meta and self.plan.source is not None) or self._copyable(t):
                out.append(r)
        return out

    def _stage(self, unit: str, slot: int | None) -> _Staged:
        """Stage a unit's tensors: into staging slot ``slot`` (pinned, for the GPU) or, with
        ``slot=None``, read stored ones into fresh CPU tensors."""
        src = self.plan.source
        recs = self._to_stage(unit)
        staged = _Staged(slot=slot)
        reads: list[tuple[Entry, torch.Tensor]] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        if slot is not None:
            event = self._events[slot]
            if event is not None:
                event.synchronize()  # the previous unit's copies out of this buffer have finished
            buf, used = self._staging[slot].buffer, 0
            for rec in recs:
                t = rec.get()
                if not t.is_meta:
                    n = t.numel() * t.element_size()
                    view = buf[used:used + n].view(t.dtype).view(t.shape)
                    used += aligned(n)
                    staged.pieces[id(rec)] = [view]
                    copies.append((t, view))
                    continue
                assert src is not None
                for e in self._entries(rec):
                    view = buf[used:used + e.nbytes].view(e.dtype).view(e.shape)
                    used += aligned(e.nbytes)
                    staged.pieces.setdefault(id(rec), []).append(view)
                    reads.append((e, view))
        else:
            for rec in recs:
                assert src is not None
                for e in self._entries(rec):
                    t = torch.empty(e.shape, dtype=e.dtype)
                    staged.pieces.setdefault(id(rec), []).append(t)
                    reads.append((e, t))
        # Largest first: the pool's threads finish together. copy_ releases the GIL, so host copies
        # (page faults into a memory-mapped file included) run in parallel like the reads.
        jobs: list[tuple[int, Callable[[], object]]] = []
        if src is not None:
            jobs += [(e.nbytes, partial(src.read_into, e, t)) for e, t in reads]
        jobs += [(t.numel() * t.element_size(), partial(t_out.copy_, t)) for t, t_out in copies]
        for f in [self._pool.submit(job) for _, job in sorted(jobs, key=lambda j: -j[0])]:
            f.result()
        self.read_bytes += sum(e.nbytes for e, _ in reads)
        self.copied_bytes += sum(t.numel() * t.element_size() for t, _ in copies)
        return staged

    def _unit_bytes(self, unit: str) -> int:
        total = 0
        for r in self._to_stage(unit):
            t = r.get()
            total += (sum(aligned(e.nbytes) for e in self._entries(r)) if t.is_meta
                      else aligned(t.numel() * t.element_size()))
        return total

    # -- bringing -------------------------------------------------------------------------------
    def bring_all(self, order: Sequence[str], after: Callable[[str], None] | None = None) -> None:
        """Make every tensor of each unit in ``order`` real on the device, quantized when the plan says;
        ``after(unit)`` runs once a unit is ready (the next unit is already being read)."""
        staged_gpu = self.device.type == "cuda"
        todo = [u for u in order if self._to_stage(u)]
        if staged_gpu and todo and not self._staging:
            biggest = max(self._unit_bytes(u) for u in todo)
            for _ in range(2):
                self._staging.append(HostArena(biggest, pin=True, device=self.device))
                self._events.append(None)
        futures: dict[str, Future[_Staged]] = {}
        slot = 0

        def submit(i: int) -> None:
            nonlocal slot
            if i < len(todo):
                futures[todo[i]] = self._reader.submit(self._stage, todo[i], slot if staged_gpu else None)
                slot ^= 1

        submit(0)
        nxt = 1
        for unit in order:
            t0 = time.perf_counter()
            staged = None
            if unit in futures:
                staged = futures.pop(unit).result()
                submit(nxt)  # read the next unit while this one goes to the device
                nxt += 1
            self.read_s += time.perf_counter() - t0
            self._place(unit, staged)
            if self.plan.quantize is not None:
                self._quantize(unit)
            if after is not None:
                after(unit)

    def _place(self, unit: str, staged: _Staged | None) -> None:
        for rec in self.members[unit]:
            t = rec.get()
            if not t.is_meta and staged is not None and id(rec) in staged.pieces:
                value = staged.pieces[id(rec)][0].to(self.device, non_blocking=True)
                if rec.buffer:
                    rec.set_new(value)
                else:
                    _assign(t, value)
                continue
            if not t.is_meta:
                if t.device != self.device:
                    if rec.buffer:
                        rec.set_new(t.to(self.device))
                    else:
                        _assign(t, _moved(t, self.device))
                continue
            assert staged is not None
            parts = [p.to(self.device, non_blocking=True) if p.device != self.device else p
                     for p in staged.pieces[id(rec)]]
            value = parts[0] if len(parts) == 1 else torch.cat(parts)
            rec.set_new(value.to(t.dtype) if value.dtype != t.dtype else value)
        if staged is not None and staged.slot is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[staged.slot] = event

    def _quantize(self, unit: str) -> None:
        from fluxtune.tuning.quantize import quantize_module

        assert self.plan.quantize is not None
        t0 = time.perf_counter()
        if unit == REST:
            prefixes = tuple(b + "." for b in self.blocks)

            def only(fqn: str) -> bool:
                return not fqn.startswith(prefixes)
        else:
            def only(fqn: str) -> bool:
                return fqn.startswith(unit + ".")
        done, excluded = quantize_module(self.component, self.plan.quantize, on_cuda=self.on_cuda, only=only)
        self.quantized += done
        self.excluded += excluded
        self.quantize_s += time.perf_counter() - t0

    def move_unit(self, unit: str, device: torch.device) -> None:
        """Move a brought unit somewhere else (offloaded components: back to the host)."""
        for rec in self.members[unit]:
            t = rec.get()
            if t.device != device:
                if rec.buffer:
                    rec.set_new(t.to(device))
                else:
                    _assign(t, _moved(t, device))

    def close(self) -> None:
        self._pool.shutdown()
        self._reader.shutdown()
        for arena in self._staging:
            arena.close()
        self._staging.clear()
        if self.plan.source is not None:
            self.plan.source.close()

    def describe(self) -> str:
        parts = []
        if self.plan.source is not None:
            parts.append(f"read {self.read_bytes / 1e9:.2f}GB from {self.plan.source.directory.name}/ "
                         f"(waited {self.read_s:.1f}s on reads)")
        if self.copied_bytes:
            parts.append(f"copied {self.copied_bytes / 1e9:.2f}GB from host memory through page-locked staging")
        if self.plan.quantize is not None:
            extra = f", {len(self.excluded)} kept in higher precision" if self.excluded else ""
            parts.append(f"{self.plan.quantize.method} on {self.device} unit by unit: {len(self.quantized)} Linear "
                         f"layers{extra} ({self.quantize_s:.1f}s)")
        return "; ".join(parts)


def materialize(component: torch.nn.Module, plan: WeightPlan, device: torch.device, *, on_cuda: bool,
                then: torch.device | None = None) -> Materializer:
    """Bring every unit of ``component`` to ``device`` (and on to ``then``, unit by unit, when given)."""
    mat = Materializer(component, plan, device, on_cuda=on_cuda)
    try:
        dest = then
        mat.bring_all(mat.units, (lambda u: mat.move_unit(u, dest)) if dest is not None and dest != device else None)
    finally:
        mat.close()
    return mat


def has_meta(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])

