"""compile.fuse_qkv: one Q/K/V projection instead of three (must precede quantization)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fluxtune.tuning.base import FUSE, Context, Handler, register

_INITS = ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch.nn.init while fusing: the fused Linear's random init is overwritten at once.

    On a host-resident FLUX.1-dev transformer that init is ~17 s of CPU random numbers (measured: 0.3 s
    per block), against ~1 s for the concatenation itself.
    """
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


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
            with _no_init():
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
            with _no_init():
                vae.fuse_qkv_projections()
            ctx.report.add(self.name, "vae", "fused q/k/v projections", seconds=time.perf_counter() - t0)
