"""offload: where each component's weights live (GPU, host with hooks, or partially resident)."""

from __future__ import annotations

import contextlib
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from fluxtune.knobs import GroupOffload, ModelOffload, NoOffload, PartialResidency, SequentialOffload
from fluxtune.tuning.base import PLACEMENT, Context, Handler, register
from fluxtune.tuning.state import set_weight_plan, weight_plan
from fluxtune.units import format_bytes

if TYPE_CHECKING:
    from fluxtune.tuning.materialize import Materializer

_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def parallel_host_pinning() -> str | None:
    """Let pinned host allocations fault in and register their pages on several threads.

    torch's default pinned allocator (cudaHostAlloc, one thread) managed 1.2 GB/s on the H200's host,
    so pinning the 12 GB an 8 GB profile streams took 12 s of ``apply``. The allocator's own
    ``pinned_use_cuda_host_register`` mode mallocs, touches the pages on N threads, then registers
    them. Process-wide, like every allocator setting; left alone when the user configured pinning.
    Returns what was set, or None.
    """
    import torch

    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "pinned_" in conf:
        return None
    threads = 1
    while threads * 2 <= min(16, os.cpu_count() or 1):  # the allocator wants a power of two
        threads *= 2
    setting = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        if set_settings is not None:
            set_settings(setting)
        else:
            torch.cuda.memory._set_allocator_settings(setting)
    except (RuntimeError, AttributeError):  # an older torch without these keys: pin the slow way
        return None
    return setting


def _pins_host_memory(off: Any) -> bool:
    # diffusers' group offload pins through torch's allocator; partial residency has its own arenas.
    return isinstance(off, GroupOffload) and off.use_stream and not off.low_cpu_mem_usage and off.disk_path is None


def _remove_group_offload(module: Any) -> None:
    # diffusers has no disable_group_offload (diffusers-knobs.md §1.3): remove the three hooks by name.
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in _GROUP_HOOKS:
        registry.remove_hook(name, recurse=True)


@register
class PlacementHandler(Handler):
    name = "offload"
    phase = PLACEMENT

    def check(self, ctx: Context) -> list[str]:
        problems: list[str] = []
        offloaded = 0
        for name, module in ctx.components().items():
            off = ctx.profile.component(name).offload
            if isinstance(off, PartialResidency):
                from fluxtune.tuning.streaming import repeated_blocks

                if not repeated_blocks(module):
                    problems.append(f"{name}.offload.mode=partial: {type(module).__name__} has no repeated blocks")
            if isinstance(off, GroupOffload) and off.level == "block":
                from fluxtune.tuning.streaming import CALLED_OUTSIDE_THEIR_BLOCK

                outside = CALLED_OUTSIDE_THEIR_BLOCK.get(type(module).__name__)
                if outside:
                    problems.append(f"{name}.offload.level=block: {type(module).__name__} calls {outside[0]} "
                                    "outside that block, where block-level group offload has moved it back to "
                                    "the CPU; use level=leaf or mode=partial")
            if not isinstance(off, NoOffload):
                from fluxtune.tuning.streaming import module_bytes

                offloaded += module_bytes(module)
            if isinstance(off, PartialResidency | GroupOffload) and ctx.profile.compile.inductor_mode in (
                "reduce-overhead", "max-autotune") and ctx.profile.compile.enabled and name == "transformer":
                problems.append(f"compile.inductor_mode={ctx.profile.compile.inductor_mode} uses CUDA graphs, "
                                f"which need fixed weight addresses; with {name}.offload.mode={off.mode} use "
                                "max-autotune-no-cudagraphs or default")
        from fluxtune.memory import default_host_budget

        host = ctx.profile.budget.host_ram or (default_host_budget(ctx.hardware.host_ram_bytes)
                                               if ctx.hardware.host_ram_bytes else None)
        if offloaded and host and offloaded > host:
            problems.append(f"budget.host_ram={format_bytes(host)}: the offloaded components need "
                            f"{format_bytes(offloaded)} of host memory; quantize them or raise the host budget")
        return problems

    def apply(self, ctx: Context) -> None:
        import torch

        comps = ctx.components()
        modes = {n: ctx.profile.component(n).offload for n in comps}
        # Model offload: chain accelerate hooks in the pipeline's own order, so each component leaves
        # the GPU when the next one starts (what enable_model_cpu_offload does, per component here).
        seq = [n for n in (getattr(ctx.pipe, "model_cpu_offload_seq", "") or "").split("->") if n in comps]
        seq += [n for n in comps if n not in seq]
        model_hooks: list[Any] = []
        if ctx.on_gpu and any(_pins_host_memory(modes[n]) for n in comps):
            setting = parallel_host_pinning()
            if setting is not None:
                ctx.report.add(self.name, "pipeline", f"host pinning on several threads ({setting})")
        for name in seq:
            off, module = modes[name], comps[name]
            t0 = time.perf_counter()
            plan = weight_plan(module)
            from fluxtune.tuning.materialize import Materializer

            mat = Materializer(module, plan, ctx.device, on_cuda=ctx.on_gpu) if plan is not None else None
            try:
                detail = self._place(ctx, name, module, off, mat, model_hooks)
            finally:
                if mat is not None:
                    mat.close()
                    set_weight_plan(module, None)
            if mat is not None and mat.describe():
                detail += f"; {mat.describe()}"
            if ctx.on_gpu:
                torch.cuda.synchronize(ctx.device)
            ctx.report.add(self.name, name, detail, seconds=time.perf_counter() - t0)
        if ctx.on_gpu:
            # Weights that moved to the host leave cached blocks behind; hand them back now so the
            # reserved memory (and a cap set next) reflects the placement, not the loading.
            torch.cuda.empty_cache()
        if model_hooks:
            # The last hooked component stays on the GPU after a call unless somebody offloads it.
            ctx.after_call.append(partial(_offload_all, model_hooks))

    def _place(self, ctx: Context, name: str, module: Any, off: Any, mat: Materializer | None,
               model_hooks: list[Any]) -> str:
        """Put one component where ``off`` says; weights still to be read or quantized go unit by unit."""
        import torch

        host = torch.device("cpu")
        if isinstance(off, NoOffload):
            if mat is not None:
                mat.bring_all(mat.units)
            module.to(ctx.device)
            return f"resident on {ctx.device}"
        if mat is not None and not isinstance(off, PartialResidency):
            # Offloaded components live on the host: each unit is read/quantized on the device, then moved.
            mat.bring_all(mat.units, lambda unit: mat.move_unit(unit, host))
        if isinstance(off, ModelOffload):
            from accelerate import cpu_offload_with_hook

            _, hook = cpu_offload_with_hook(module, ctx.device, prev_module_hook=model_hooks[-1] if model_hooks else None)
            model_hooks.append(hook)
            ctx.undo.append((self.name, partial(_remove_accelerate, module)))
            detail = "model offload (on the GPU only while it runs)"
            if ctx.hardware.emulated_on and ctx.hardware.h2d_gbs and ctx.on_gpu:
                detail += f"; {_pace_model_offload(module, ctx.hardware.h2d_gbs, ctx.device)}"
        elif isinstance(off, SequentialOffload):
            from accelerate import cpu_offload

            cpu_offload(module, execution_device=ctx.device, offload_buffers=len(module._parameters) > 0)
            ctx.undo.append((self.name, partial(_remove_accelerate, module)))
            detail = "sequential offload (each layer on the GPU only for its forward)"
        elif isinstance(off, GroupOffload):
            detail = self._group(ctx, name, module, off)
        else:
            assert isinstance(off, PartialResidency)
            from fluxtune.tuning.state import set_streamer
            from fluxtune.tuning.streaming import BlockStreamer

            # Under card emulation the copies are paced to the emulated card's host->device rate.
            streamer = BlockStreamer(module, ctx.device, resident_bytes=off.resident,
                                     resident_blocks=off.resident_blocks, prefetch=off.prefetch,
                                     pace_gbs=ctx.hardware.h2d_gbs if ctx.hardware.emulated_on else None,
                                     materializer=mat)
            ctx.undo.append((self.name, streamer.remove))
            set_streamer(module, streamer)
            detail = f"partial residency: {streamer.describe()}"
        if ctx.hardware.emulated_on and isinstance(off, SequentialOffload):
            detail += f" (copies NOT paced to the emulated {ctx.hardware.h2d_gbs:g} GB/s: accelerate's hooks run at this link's rate)"
        return detail

    def _group(self, ctx: Context, name: str, module: Any, off: GroupOffload) -> str:
        import torch
        from diffusers.hooks import apply_group_offloading

        kwargs: dict[str, Any] = dict(
            onload_device=ctx.device, offload_device=torch.device("cpu"),
            offload_type="block_level" if off.level == "block" else "leaf_level",
            num_blocks_per_group=off.blocks_per_group if off.level == "block" else None,
            non_blocking=off.use_stream, use_stream=off.use_stream, record_stream=off.record_stream,
            low_cpu_mem_usage=off.low_cpu_mem_usage, offload_to_disk_path=off.disk_path,
        )
        # apply_group_offloading skips the _supports_group_offloading check, so it also serves DiT and
        # the transformers text encoders.
        apply_group_offloading(module, **kwargs)
        ctx.undo.append((self.name, lambda: _remove_group_offload(module)))
        paced = ""
        if ctx.hardware.emulated_on and ctx.hardware.h2d_gbs and ctx.on_gpu:
            paced = f"; {_pace_groups(module, ctx.hardware.h2d_gbs, ctx.device)}"
        level = f"block level, {off.blocks_per_group} block(s)/group" if off.level == "block" else "leaf level"
        if off.level == "block" and not any(isinstance(c, torch.nn.ModuleList | torch.nn.Sequential)
                                            for c in module.children()):
            # diffusers only chunks top-level block lists: here the whole component is one group.
            level += " (no top-level block list: the whole component moves as one group)"
        return f"group offload, {level}{', streams' if off.use_stream else ''}{paced}"


def _pace_groups(module: Any, gbs: float, device: Any) -> str:
    """Pace diffusers' group-offload copies like fluxtune's streamer under card emulation (see CopyPacer).

    Reaches into diffusers' hook registry (``_diffusers_hook`` / ``group_offloading``): if its layout
    changes, the copies run unpaced and the report says so.
    """
    import torch

    from fluxtune.tuning.streaming import CopyPacer, tensor_bytes

    pacer = CopyPacer(gbs, device)
    groups: dict[int, Any] = {}
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        group = getattr(hook, "group", None)
        if group is not None and hasattr(group, "onload_"):
            groups[id(group)] = group
    for group in groups.values():
        nbytes = sum(tensor_bytes(t) for t in getattr(group, "cpu_param_dict", {}).values())

        def onload(group: Any = group, original: Any = group.onload_, nbytes: int = nbytes) -> None:
            original()
            # The wait goes on the copy stream (compute waits for it as for the copy), or on the compute
            # stream when diffusers copies synchronously.
            with torch.cuda.stream(group.stream) if group.stream is not None else contextlib.nullcontext():
                pacer.pace(nbytes)

        group.onload_ = onload
    if not groups:
        return "copies NOT paced (diffusers' group layout not recognised)"
    return pacer.describe()


def _pace_model_offload(module: Any, gbs: float, device: Any) -> str:
    """Pace accelerate's model-offload onload (the whole component's ``.to(device)``) under card emulation.

    The wait is enqueued on the current stream after the copy, so the component's forward starts when
    the copy would have ended on the emulated card. The native rate it is paced from is the page-locked
    one, while accelerate copies from pageable memory (slower): the paced recipe is, if anything, faster
    than on the card. Reaches into accelerate's ``_hf_hook``: if that changes, the copies run unpaced
    and the report says so.
    """
    from fluxtune.tuning.streaming import CopyPacer, tensor_bytes

    hook: Any = getattr(module, "_hf_hook", None)
    original = getattr(hook, "pre_forward", None)
    if original is None:
        return "copies NOT paced (accelerate's offload hook not recognised)"
    pacer = CopyPacer(gbs, device)
    nbytes = sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])

    def pre_forward(mod: Any, *args: Any, **kwargs: Any) -> Any:
        # Looked up per call: .to() may replace a tensor subclass's Parameter object.
        first = next(mod.parameters(), None)
        moved = first is not None and first.device.type == "cpu"
        out = original(mod, *args, **kwargs)
        if moved:
            pacer.pace(nbytes)
        return out

    hook.pre_forward = pre_forward
    return pacer.describe()


def _offload_all(hooks: list[Any]) -> None:
    for hook in hooks:
        hook.offload()


def _remove_accelerate(module: Any) -> None:
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
