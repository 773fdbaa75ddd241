"""budget: cap this process's GPU memory so exceeding the budget raises instead of spilling."""

from __future__ import annotations

from fluxtune.tuning.base import BUDGET, Context, Handler, register
from fluxtune.units import format_bytes


def _gpu_weight_bytes(ctx: Context) -> int:
    from fluxtune.tuning.streaming import module_bytes

    return sum(module_bytes(m, "cuda") for m in ctx.components().values())


@register
class BudgetHandler(Handler):
    name = "budget"
    phase = BUDGET

    def check(self, ctx: Context) -> list[str]:
        b = ctx.profile.budget
        if b.vram is None or not b.enforce or not ctx.on_gpu:
            return []
        total = ctx.hardware.total_memory_bytes
        if total is not None and b.vram > total:
            return [
                f"budget.vram={format_bytes(b.vram)} is more than this GPU has ({format_bytes(total)}): "
                f"lower it or set budget.enforce=false"
            ]
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
        # What this pipeline's own weights occupy on the GPU now (other tensors of the process, e.g. a
        # previous pipeline not yet collected, are not this profile's doing).
        held = _gpu_weight_bytes(ctx)
        if held > b.vram:
            from fluxtune.errors import BudgetExceededError

            raise BudgetExceededError(
                f"budget.vram={format_bytes(b.vram)}: after placing the weights the pipeline holds "
                f"{format_bytes(held)} on the GPU; offload or quantize more (e.g. transformer.offload.mode=partial)"
            )
        # The caching allocator raises OutOfMemoryError once reserved memory would pass this fraction.
        torch.cuda.set_per_process_memory_fraction(b.vram / total, index)
        ctx.undo.append((self.name, lambda: torch.cuda.set_per_process_memory_fraction(1.0, index)))
        ctx.report.add(self.name, "pipeline", f"process capped at {format_bytes(b.vram)} of {format_bytes(total)}")
