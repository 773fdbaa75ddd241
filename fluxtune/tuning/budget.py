"""budget: cap this process's GPU memory so that the whole process stays within the card.

``budget.vram`` is the whole-process footprint NVML reports (see :class:`fluxtune.knobs.Budget`), but
PyTorch can only cap its caching allocator. So the allocator cap is the budget less what the process
holds outside the allocator: the CUDA context and library workspaces measured when the cap is set, plus
a margin for what the first call still loads (kernel images of lazily loaded modules, cuBLAS/cuDNN
handles), plus the display reserve.
"""

from __future__ import annotations

import os

from fluxtune.tuning.base import ALLOCATOR, BUDGET, Context, Handler, register
from fluxtune.units import format_bytes

FIRST_CALL_GROWTH = 320 * 2**20
"""Growth of the memory outside the allocator from the moment of the cap to the peak of a call. On the
H200 (CUDA 13, torch 2.11) the NVML process footprint minus the allocator's reserved bytes was 0.79-0.83 GB
at the peak of FLUX presets' runs; see docs/results/2026-12-02 for the split into context-at-apply and growth."""

CONTEXT_FALLBACK = 600 * 2**20
"""What the CUDA context and workspaces are taken to be when NVML cannot tell (containers that report host
PIDs): the H200's context after placing a pipeline was about this size."""


def _gpu_weight_bytes(ctx: Context) -> int:
    from fluxtune.tuning.streaming import module_bytes

    return sum(module_bytes(m, "cuda") for m in ctx.components().values())


def outside_allocator(index: int) -> tuple[int, str]:
    """Bytes this process holds on GPU ``index`` outside PyTorch's allocator, and how that was found."""
    import torch

    from fluxtune.hardware import process_memory_used

    nvml = process_memory_used(index)
    if nvml is None:
        return CONTEXT_FALLBACK, "assumed (NVML cannot see this process)"
    return max(0, nvml - int(torch.cuda.memory_reserved(index))), "measured (NVML process memory - allocator)"


def set_expandable_segments(on: bool) -> bool | None:
    """Switch the CUDA caching allocator's expandable segments; returns the previous state (None: unknown,
    e.g. a torch without the runtime setting). Segments already made keep their kind."""
    import torch

    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    set_ = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if set_ is None:
        return None
    # The last setting made at run time wins over the environment (which fluxtune's own pinning setting,
    # made at run time, does not repeat): read whichever last mentions the key.
    env = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    runtime = get() if get is not None else ""
    conf = (runtime if "expandable_segments" in runtime else env).replace(" ", "").lower()
    before = "expandable_segments:true" in conf
    set_(f"expandable_segments:{on}")
    return before


def _fixed_segments() -> None:
    set_expandable_segments(False)


def allocator_cap(vram: int, outside: int, display_reserve: int | None) -> int:
    """What the allocator may reserve so that the whole process stays within ``vram``."""
    return vram - outside - FIRST_CALL_GROWTH - (display_reserve or 0)


@register
class BudgetHandler(Handler):
    name = "budget"
    phase = BUDGET

    def check(self, ctx: Context) -> list[str]:
        b = ctx.profile.budget
        if b.vram is None or not b.enforce or not ctx.on_gpu:
            return []
        total = ctx.hardware.total_memory_bytes
        card = ctx.hardware.gpu_name or "this GPU"
        if total is not None and b.vram > total:
            return [
                f"budget.vram={format_bytes(b.vram)} is more than the {card} has ({format_bytes(total)}): "
                f"lower it or set budget.enforce=false"
            ]
        if b.display_reserve is not None and b.display_reserve >= b.vram:
            return [f"budget.display_reserve={format_bytes(b.display_reserve)} leaves nothing of budget.vram="
                    f"{format_bytes(b.vram)}: lower the reserve"]
        return []

    def apply(self, ctx: Context) -> None:
        import torch

        b = ctx.profile.budget
        if b.vram is None:
            return
        if not b.enforce:
            ctx.report.add(self.name, "pipeline", f"vram {format_bytes(b.vram)} declared, not enforced")
            return
        if not ctx.on_gpu:
            ctx.skip(self.name, "pipeline", "no CUDA device: a VRAM cap has nothing to hold")
            return
        index = ctx.device.index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.empty_cache()
        outside, how = outside_allocator(index)
        cap = allocator_cap(b.vram, outside, b.display_reserve)
        # What this pipeline's own weights occupy on the GPU now (other tensors of the process, e.g. a
        # previous pipeline not yet collected, are not this profile's doing).
        held = _gpu_weight_bytes(ctx)
        if held > cap:
            from fluxtune.errors import BudgetExceededError

            raise BudgetExceededError(
                f"budget.vram={format_bytes(b.vram)}: after placing the weights the pipeline holds "
                f"{format_bytes(held)} on the GPU, more than the {format_bytes(cap)} left to PyTorch once the CUDA "
                f"context ({format_bytes(outside)}) and workspaces are counted; offload or quantize more "
                "(e.g. transformer.offload.mode=partial)"
            )
        # The caching allocator raises OutOfMemoryError once reserved memory would pass this fraction.
        torch.cuda.set_per_process_memory_fraction(cap / total, index)
        ctx.undo.append((self.name, lambda: torch.cuda.set_per_process_memory_fraction(1.0, index)))
        reserve = f" - display {format_bytes(b.display_reserve)}" if b.display_reserve else ""
        ctx.report.add(
            self.name, "pipeline",
            f"whole process within {format_bytes(b.vram)}: allocator capped at {format_bytes(cap)} = budget - "
            f"context {format_bytes(outside)} {how} - first-call margin {format_bytes(FIRST_CALL_GROWTH)}{reserve}")


@register
class AllocatorHandler(Handler):
    """``budget.expandable_segments``: switched before any weight is quantized or placed.

    Segments keep the kind they were made with, so switching after placement (as the budget's cap is) left
    the resident weights and the holes between them in fixed segments: on the H200 FLUX.2 [dev] ran out of
    memory with the same allocator numbers, byte for byte, with the switch as without it."""

    name = "allocator"
    phase = ALLOCATOR

    def check(self, ctx: Context) -> list[str]:
        return []

    def apply(self, ctx: Context) -> None:
        if not ctx.profile.budget.expandable_segments:
            return
        if not ctx.on_gpu:
            ctx.skip(self.name, "pipeline", "no CUDA device: expandable segments are a CUDA allocator setting")
            return
        before = set_expandable_segments(True)
        if before is None:
            ctx.report.add(self.name, "pipeline", "expandable segments NOT set (this torch cannot switch them at run time)")
            return
        if not before:
            ctx.undo.append((self.name, _fixed_segments))
        ctx.report.add(self.name, "pipeline", "allocator segments expandable from here on (process-wide; segments "
                       "made before keep their kind)")
