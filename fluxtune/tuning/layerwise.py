"""layerwise_casting: store weights in fp8 and upcast each layer for its forward (memory only)."""

from __future__ import annotations

from fluxtune.tuning.base import CASTING, Context, Handler, register, torch_dtype


@register
class LayerwiseCastingHandler(Handler):
    name = "layerwise"
    phase = CASTING
    reversible = False

    def apply(self, ctx: Context) -> None:
        import torch
        from diffusers.hooks import apply_layerwise_casting

        for name, module in ctx.components().items():
            lc = ctx.profile.component(name).layerwise_casting
            if lc is None:
                continue
            storage = getattr(torch, lc.storage)
            dtype = ctx.profile.component(name).dtype
            compute = torch_dtype(dtype) if dtype else next(p.dtype for p in module.parameters() if p.is_floating_point())
            if hasattr(module, "enable_layerwise_casting"):
                # diffusers models add their own skip patterns (_skip_layerwise_casting_patterns, fp32 modules).
                module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute,
                                               skip_modules_pattern=lc.skip)
            else:
                apply_layerwise_casting(module, storage, compute,
                                        skip_modules_pattern=lc.skip if lc.skip is not None else "auto")
            ctx.report.add(self.name, name, f"weights stored as {lc.storage}, computed in {compute}".replace("torch.", ""))
