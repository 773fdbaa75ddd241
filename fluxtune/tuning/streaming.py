"""Partial residency: keep most transformer blocks on the GPU and stream the others, one step ahead.

diffusers' group offloading streams *every* block, so under a 12 GB cap FLUX.1-dev moves its whole
22 GiB transformer across PCIe at every step. Here the blocks that fit stay resident, and the streamed
ones are spread evenly between them, so each streamed block's copy (on a side CUDA stream, from pinned
host memory) overlaps the compute of the resident blocks before it. At most ``prefetch + 1`` streamed
blocks are on the GPU at once. Works with plain and torchao-quantized weights (tensor subclasses are
pinned and moved through their inner tensors), and with any model whose repeated blocks run in
definition order: the transformer, and the T5 and CLIP text encoders.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fluxtune.knobs import choose_streamed
from fluxtune.tuning.hostmem import HostArena, aligned

if TYPE_CHECKING:
    from fluxtune.tuning.materialize import Materializer


def _inner(t: torch.Tensor) -> list[torch.Tensor] | None:
    """The inner tensors of a tensor subclass (torchao), or None for a plain tensor/parameter.

    Read as attributes only: a streamed torchao weight's wrapper keeps its original device while its
    inner tensors move, so running any op on it (even ``.data``/``detach``) while offloaded fails.
    """
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or not hasattr(t, "__tensor_flatten__"):
        return None
    return [getattr(t, n) for n in t.__tensor_flatten__()[0]]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies, looking through tensor subclasses (torchao) at their inner tensors."""
    inner = _inner(t)
    if inner is None:
        return t.numel() * t.element_size()
    return sum(tensor_bytes(x) for x in inner)


def tensor_on(t: torch.Tensor, device_type: str) -> bool:
    """Whether the tensor's storage (its inner tensors, for subclasses) lives on ``device_type``."""
    inner = _inner(t)
    if inner is None:
        return t.device.type == device_type
    return any(tensor_on(x, device_type) for x in inner)


def module_bytes(module: torch.nn.Module, device_type: str | None = None) -> int:
    """Bytes of a module's parameters and buffers (quantized sizes for torchao weights), optionally
    only those stored on ``device_type``."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor_bytes(t) for t in tensors if device_type is None or tensor_on(t, device_type))


def _rebuild(t: torch.Tensor, leaf: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``leaf`` applied to a plain tensor, or to each inner tensor of a subclass (rebuilt around them);
    no op runs on a subclass itself, which matters for a streamed torchao weight whose wrapper and
    inner tensors sit on different devices."""
    if _inner(t) is None:
        return leaf(t.detach())
    names, ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = {n: _rebuild(getattr(t, n), leaf) for n in names}
    return type(t).__tensor_unflatten__(inner, ctx, t.shape, t.stride())  # type: ignore[attr-defined, no-any-return]


def _moved(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A copy of ``t`` on ``device``, built from its inner tensors (see :func:`_rebuild`)."""
    return _rebuild(t, lambda x: x.to(device))


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (itself, or a subclass's inner tensors)."""
    inner = _inner(t)
    return [t] if inner is None else [x for i in inner for x in _leaves(i)]


def _is_subclass(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__")


def _assign(param: torch.Tensor, source: torch.Tensor) -> None:
    """Point ``param`` at ``source``'s storage, keeping the parameter object (hooks, optimizers and
    compiled graphs refer to it). For tensor subclasses (torchao) ``.data =`` only swaps the outer
    wrapper and leaves ``qdata``/``scale`` where they were, so their inner tensors are set instead."""
    if _is_subclass(param):
        for name in param.__tensor_flatten__()[0]:  # type: ignore[attr-defined]
            setattr(param, name, getattr(source, name))
    else:
        param.data = source


def _record(t: torch.Tensor, stream: torch.cuda.Stream) -> None:
    # Tells the caching allocator the compute stream uses memory the copy stream allocated, so it is
    # not handed out again while a kernel may still read it.
    if not _is_subclass(t):
        t.record_stream(stream)
        return
    for n in t.__tensor_flatten__()[0]:  # type: ignore[attr-defined]
        _record(getattr(t, n), stream)


def repeated_blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks in execution order: the children of every outermost ModuleList of identical
    blocks, in definition order. FLUX: ``transformer_blocks``, ``single_transformer_blocks``; T5:
    ``encoder.block``; CLIP: its encoder's ``layers``; Qwen3 / Qwen2.5-VL: ``model.(language_model.)layers``.

    A list counts from two blocks of one class, or from one block of a class the model declares in
    diffusers' ``_repeated_blocks`` (FLUX.2 [klein] 4B has 5 double-stream blocks; a tiny variant, one).
    A list of different modules (an attention's ``to_out``: Linear, Dropout) is not a block list."""
    out: list[tuple[str, torch.nn.Module]] = []
    declared = set(getattr(module, "_repeated_blocks", None) or ())

    def visit(prefix: str, parent: torch.nn.Module) -> None:
        for name, child in parent.named_children():
            items: list[torch.nn.Module] = list(child) if isinstance(child, torch.nn.ModuleList) else []
            kinds = {type(b).__name__ for b in items}
            if len(kinds) == 1 and (len(items) > 1 or kinds <= declared):
                out.extend((f"{prefix}{name}.{i}", block) for i, block in enumerate(items))
            else:
                visit(f"{prefix}{name}.", child)

    visit("", module)
    return out


CALLED_OUTSIDE_THEIR_BLOCK: dict[str, tuple[str, ...]] = {
    # DiT reads block 0's AdaLN embedding again after the loop, when block 0 is no longer loaded.
    "DiTTransformer2DModel": ("transformer_blocks.0.norm1.emb",),
}
"""Per model class, submodules of repeated blocks that the model also calls outside the block's own
forward: streaming keeps them resident (and block-level group offload cannot place them)."""


def _outside_calls(model: torch.nn.Module) -> set[int]:
    """Ids of the modules (with their children) of :data:`CALLED_OUTSIDE_THEIR_BLOCK` for this model."""
    ids: set[int] = set()
    for name in CALLED_OUTSIDE_THEIR_BLOCK.get(type(model).__name__, ()):
        try:
            sub = model.get_submodule(name)
        except AttributeError:  # a configuration of the model without that submodule
            continue
        ids.update(id(m) for m in sub.modules())
    return ids


_Home = tuple[torch.nn.Module, str, torch.Tensor]  # (module, parameter name, host copy)


def _host_homes(block: torch.nn.Module, device: torch.device, keep: set[int]) -> tuple[HostArena, list[_Home]]:
    """One block's parameters copied into one arena (page-locked on a CUDA device), in module order."""
    params = [(m, n, p) for m in block.modules() if id(m) not in keep for n, p in m.named_parameters(recurse=False)]
    size = sum(aligned(x.numel() * x.element_size()) for _, _, p in params for x in _leaves(p))
    arena = HostArena(size, pin=device.type == "cuda" and torch.cuda.is_available(), device=device)
    homes = [(m, n, _rebuild(p, arena.take)) for m, n, p in params]
    if arena.pinned:
        torch.cuda.current_stream(device).synchronize()  # the async copies out of the GPU have landed
    return arena, homes


@dataclass
class _Streamed:
    block: torch.nn.Module
    homes: list[tuple[torch.nn.Module, str, torch.Tensor]] = field(default_factory=list)
    event: torch.cuda.Event | None = None
    loaded: bool = False
    nbytes: int = 0


class CopyPacer:
    """Makes host->device copies on a stream last as long as over a slower link (card emulation).

    After a block's copies, a GPU sleep kernel on the same side stream holds that stream until the copy
    would have ended at ``gbs``; compute waits on the event recorded after it, so copies still overlap
    compute exactly as they would on the emulated card. Nothing waits on the host.
    """

    def __init__(self, gbs: float, device: torch.device) -> None:
        self.gbs = gbs
        self.cycles_per_s, self.native_gbs = _clock_and_link(device.index or 0)

    def extra_seconds(self, nbytes: int) -> float:
        """How much longer ``nbytes`` take at the paced rate than over this machine's link."""
        return max(0.0, nbytes / (self.gbs * 1e9) - nbytes / (self.native_gbs * 1e9))

    def pace(self, nbytes: int) -> None:
        """Enqueue the wait on the current stream (call it inside ``torch.cuda.stream(side)``)."""
        extra = self.extra_seconds(nbytes)
        if extra > 0:
            torch.cuda._sleep(int(extra * self.cycles_per_s))

    def describe(self) -> str:
        return f"copies paced to {self.gbs:g} GB/s (this link: {self.native_gbs:.1f} GB/s)"


def _skippable(block: torch.nn.Module) -> bool:
    """Whether diffusers hooks sit on the block itself (first_block and magcache caches): they may return
    without running the block's own forward. TaylorSeer hooks the attention inside a block, which then runs."""
    registry = getattr(block, "_diffusers_hook", None)
    return bool(registry is not None and getattr(registry, "_fn_refs", None))


@functools.cache
def _clock_and_link(index: int) -> tuple[float, float]:
    """(cycles per second of ``torch.cuda._sleep``, page-locked host->device GB/s) on GPU ``index``, measured."""
    from fluxtune.hardware import measure_h2d_gbs

    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up: the kernel's first launch loads its module
        cycles = 50_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rate = cycles / (start.elapsed_time(end) / 1e3)
    return rate, measure_h2d_gbs(index)


class BlockStreamer:
    """Hooks that stream the chosen blocks of a model (a transformer or a text encoder);
    ``remove()`` undoes everything."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        device: torch.device,
        *,
        resident_bytes: int | None = None,
        resident_blocks: int | None = None,
        prefetch: int = 1,
        pace_gbs: float | None = None,
        materializer: Materializer | None = None,
    ) -> None:
        self.transformer, self.device, self.prefetch = transformer, device, prefetch
        blocks = repeated_blocks(transformer)
        if not blocks:
            raise ValueError(f"{type(transformer).__name__} has no repeated blocks to stream")
        # Weights still to be read or quantized count at the size they will have once placed.
        sizes = [materializer.expected_bytes(n) if materializer else module_bytes(b) for n, b in blocks]
        streamed = set(choose_streamed(sizes, resident_bytes, resident_blocks))
        self.names = [blocks[i][0] for i in sorted(streamed)]
        self.resident_bytes = sum(s for i, s in enumerate(sizes) if i not in streamed)
        self.streamed_bytes = sum(sizes[i] for i in streamed)
        self.n_blocks = len(blocks)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pacer = CopyPacer(pace_gbs, device) if pace_gbs and self.stream is not None else None
        self._handles: list[Any] = []
        self._origin: dict[int, torch.device] = {}

        keep = _outside_calls(transformer)
        chosen = [blocks[i][1] for i in sorted(streamed)]
        self.items: list[_Streamed] = []
        self.arenas: list[HostArena] = []
        workers = max(1, min(16, os.cpu_count() or 1, len(chosen)))
        if materializer is None:
            # Everything but the streamed blocks moves to the device for good, and so do the parts of
            # streamed blocks that the model also calls from outside them.
            streamed_ids = {id(m) for i in streamed for m in blocks[i][1].modules()} - keep
            for module in transformer.modules():
                if id(module) in streamed_ids:
                    continue
                for p in module.parameters(recurse=False):
                    _assign(p, _moved(p, device))
                for name, b in list(module.named_buffers(recurse=False)):
                    if b is not None:
                        module._buffers[name] = b.to(device)
            # Streamed blocks keep a host copy as their home, one page-locked arena per block, built on
            # a thread pool: faulting in and locking host pages is the slow part of apply.
            with ThreadPoolExecutor(workers, thread_name_prefix="fluxtune-pin") as pool:
                built = list(pool.map(lambda b: _host_homes(b, device, keep), chosen))
            for block, (arena, homes) in zip(chosen, built, strict=True):
                self._adopt(block, arena, homes, None)
        else:
            self._materialize(materializer, blocks, streamed, keep, workers)
        for module in transformer.modules():  # buffers are small: keep them on the device
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and b.device != device:
                    module._buffers[name] = b.to(device)
        if materializer is not None:  # what was placed, not what was expected
            self.resident_bytes = sum(module_bytes(b) for i, (_, b) in enumerate(blocks) if i not in streamed)
            self.streamed_bytes = sum(item.nbytes for item in self.items)
        self._unwrap: list[tuple[Any, str, Any]] = []
        for j, item in enumerate(self.items):
            if _skippable(item.block):
                self._wrap_innermost(j)
                continue
            self._handles.append(item.block.register_forward_pre_hook(self._pre_hook(j)))
            self._handles.append(item.block.register_forward_hook(self._post_hook(j)))
        self._handles.append(transformer.register_forward_pre_hook(self._root_pre_hook))

    def _adopt(self, block: torch.nn.Module, arena: HostArena, homes: list[_Home], origin: torch.device | None) -> None:
        """Point a streamed block's parameters at their host homes in ``arena``."""
        item = _Streamed(block, nbytes=sum(tensor_bytes(h) for _, _, h in homes))
        for module, name, home in homes:
            param = module._parameters[name]
            assert param is not None
            # The wrapper's device, restored by remove() (the host for weights read from a checkpoint).
            self._origin[id(param)] = origin or param.device
            _assign(param, home)
            item.homes.append((module, name, home))
        self.items.append(item)
        self.arenas.append(arena)

    def _materialize(self, mat: Materializer, blocks: list[tuple[str, torch.nn.Module]], streamed: set[int],
                     keep: set[int], workers: int) -> None:
        """Resident units first, then each streamed block: read (or moved) onto the device, quantized
        there if the plan says, then copied into its arena on a thread while the next block is read;
        at most a few streamed blocks are on the device at once."""
        from fluxtune.tuning.materialize import REST

        names = [blocks[i][0] for i in sorted(streamed)]
        order = [n for i, (n, _) in enumerate(blocks) if i not in streamed] + [REST] + names
        pending: deque[tuple[torch.nn.Module, Future[tuple[HostArena, list[_Home]]]]] = deque()
        host = torch.device("cpu")

        def finish() -> None:
            block, fut = pending.popleft()
            arena, homes = fut.result()
            self._adopt(block, arena, homes, host)

        with ThreadPoolExecutor(workers, thread_name_prefix="fluxtune-pin") as pool:
            def after(unit: str) -> None:
                block = mat.block(unit)
                if unit not in names or block is None:
                    return
                pending.append((block, pool.submit(_host_homes, block, self.device, keep)))
                while len(pending) > 3:
                    finish()

            mat.bring_all(order, after)
            while pending:
                finish()

    # -- moving one block -----------------------------------------------------------------------
    def _load(self, j: int) -> None:
        item = self.items[j]
        if item.loaded:
            return
        if self.stream is None:
            for module, name, home in item.homes:
                _assign(module._parameters[name], home.to(self.device))  # type: ignore[arg-type]
        else:
            with torch.cuda.stream(self.stream):
                for module, name, home in item.homes:
                    _assign(module._parameters[name], home.to(self.device, non_blocking=True))  # type: ignore[arg-type]
                if self.pacer is not None:
                    self.pacer.pace(item.nbytes)
                item.event = torch.cuda.Event()
                item.event.record(self.stream)
        item.loaded = True

    def _release(self, j: int) -> None:
        item = self.items[j]
        if not item.loaded:
            return
        for module, name, home in item.homes:
            _assign(module._parameters[name], home)  # type: ignore[arg-type]
        item.loaded, item.event = False, None

    # -- hooks ----------------------------------------------------------------------------------
    def _root_pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        # A cache may have skipped blocks last step, leaving them loaded: start every forward clean.
        for j in range(len(self.items)):
            self._release(j)
        for j in range(min(self.prefetch, len(self.items))):
            self._load(j)

    @torch.compiler.disable
    def _enter(self, j: int) -> None:
        """Block ``j`` is about to run: its weights on the device (waited for), the next one's on the way."""
        self._load(j)  # no-op when prefetched
        item = self.items[j]
        if self.stream is not None and item.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.event)
            for m, name, _ in item.homes:
                _record(m._parameters[name], current)  # type: ignore[arg-type]
        if j + self.prefetch < len(self.items):
            self._load(j + self.prefetch)

    @torch.compiler.disable
    def _leave(self, j: int) -> None:
        self._release(j)

    def _pre_hook(self, j: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._enter(j)

        return hook

    def _post_hook(self, j: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._leave(j)

        return hook

    def _wrap_innermost(self, j: int) -> None:
        """Load block ``j`` inside the cache hook that may skip it: around the block's own ``forward``,
        which diffusers' block-level cache hooks (first_block, magcache) call only when the block computes.
        Torch's forward hooks run even for a skipped block, and copied its weights every step for nothing."""
        registry: Any = getattr(self.items[j].block, "_diffusers_hook")  # noqa: B009  (set by diffusers)
        ref = registry._fn_refs[0]
        attr = "original_forward" if hasattr(ref, "original_forward") else "forward"
        inner = getattr(ref, attr)

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            self._enter(j)
            try:
                return inner(*args, **kwargs)
            finally:
                self._leave(j)

        setattr(ref, attr, forward)
        self._unwrap.append((ref, attr, inner))

    def remove(self) -> None:
        """Remove the hooks and put every streamed weight back, whole, on the device it came from, so
        the module is ordinary again (a later placement may move it anywhere)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ref, attr, inner in self._unwrap:
            setattr(ref, attr, inner)
        self._unwrap.clear()
        for j, item in enumerate(self.items):
            self._release(j)
            for module, name, home in item.homes:
                param = module._parameters[name]
                assert param is not None
                origin = self._origin.get(id(param), torch.device("cpu"))
                if _inner(param) is not None:
                    _assign(param, _moved(home, origin))  # wrapper and inner tensors agree again
                else:
                    param.data = home.to(origin)
            item.homes.clear()
        for arena in self.arenas:
            arena.close()
        self.arenas.clear()

    def discard(self) -> None:
        """Remove the hooks and free the page-locked arenas without putting any weight back: for a
        module about to be thrown away (``remove`` would first copy every streamed block to its origin,
        the GPU for a model materialized there)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ref, attr, inner in self._unwrap:
            setattr(ref, attr, inner)
        self._unwrap.clear()
        self.items.clear()
        for arena in self.arenas:
            arena.close()
        self.arenas.clear()

    def describe(self) -> str:
        gb = 1e9
        out = (
            f"{self.n_blocks - len(self.items)}/{self.n_blocks} blocks resident ({self.resident_bytes / gb:.2f}GB), "
            f"{len(self.items)} streamed ({self.streamed_bytes / gb:.2f}GB per step, prefetch {self.prefetch})"
        )
        if self.stream is not None:
            unpinned = sum(not a.pinned for a in self.arenas)
            out += (f", {unpinned} of {len(self.arenas)} host arenas could not be page-locked (their copies "
                    "are synchronous)" if unpinned else f", {len(self.arenas)} page-locked host arenas")
        if self.pacer is not None:
            out += f"; {self.pacer.describe()}"
        return out
