"""precision: the compute dtype of each component."""

from __future__ import annotations

from fluxtune.tuning.base import PRECISION, Context, Handler, register, torch_dtype


@register
class PrecisionHandler(Handler):
    name = "precision"
    phase = PRECISION
    reversible = False

    def check(self, ctx: Context) -> list[str]:
        problems = []
        for name, module in ctx.components().items():
            dtype = ctx.profile.component(name).dtype
            if dtype is not None and getattr(module, "is_quantized", False):
                problems.append(
                    f"{name}.dtype={dtype}: the component was loaded quantized and cannot be cast; drop {name}.dtype"
                )
        return problems

    def apply(self, ctx: Context) -> None:
        for name, module in ctx.components().items():
            dtype = ctx.profile.component(name).dtype
            if dtype is None:
                continue
            current = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
            if current == torch_dtype(dtype):
                ctx.report.add(self.name, name, f"already {dtype}")
                continue
            module.to(torch_dtype(dtype))
            ctx.report.add(self.name, name, f"{current} -> {dtype}".replace("torch.", ""))
