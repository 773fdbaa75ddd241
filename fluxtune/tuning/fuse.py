"""compile.fuse_qkv: one Q/K/V projection instead of three (must precede quantization)."""

from __future__ import annotations

from fluxtune.tuning.base import FUSE, Context, Handler, register


def _fuse_attention_modules(module: object) -> int:
    # DiT has no fuse_qkv_projections(): fuse each legacy Attention and switch it to the fused processor.
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    count = 0
    for m in module.modules():  # type: ignore[attr-defined]
        if isinstance(m, Attention) and not getattr(m, "fused_projections", False):
            m.fuse_projections()
            m.set_processor(FusedAttnProcessor2_0())  # type: ignore[arg-type]
            count += 1
    return count


@register
class FuseQKVHandler(Handler):
    name = "fuse_qkv"
    phase = FUSE
    reversible = False

    def apply(self, ctx: Context) -> None:
        if not ctx.profile.compile.fuse_qkv:
            return
        import time

        comps = ctx.components()
        t = comps.get("transformer")
        if t is not None:
            t0 = time.perf_counter()
            if hasattr(t, "fuse_qkv_projections"):
                t.fuse_qkv_projections()
                detail = "fused q/k/v projections"
            else:
                detail = f"fused q/k/v of {_fuse_attention_modules(t)} attention modules by hand"
            # Timed: on a host-resident bf16 model the concatenation is seconds of memory traffic.
            ctx.report.add(self.name, "transformer", detail, seconds=time.perf_counter() - t0)
        vae = comps.get("vae")
        if vae is not None and hasattr(vae, "fuse_qkv_projections"):
            t0 = time.perf_counter()
            vae.fuse_qkv_projections()
            ctx.report.add(self.name, "vae", "fused q/k/v projections", seconds=time.perf_counter() - t0)
