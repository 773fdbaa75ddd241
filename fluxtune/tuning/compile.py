"""compile: torch.compile of the transformer (regional or full) and optionally the VAE decoder."""

from __future__ import annotations

import time
from typing import Any

from fluxtune.tuning.base import COMPILE, Context, Handler, register
from fluxtune.tuning.state import streamer_of

# flux-fast's inductor flags (diffusers-knobs.md §4.2); set by fluxtune, not by torchao's quantize_.
INDUCTOR_FLAGS: dict[str, Any] = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}


def _kwargs(ctx: Context) -> dict[str, Any]:
    c = ctx.profile.compile
    kw: dict[str, Any] = {"fullgraph": c.fullgraph, "dynamic": c.dynamic}
    if c.inductor_mode != "default":
        kw["mode"] = c.inductor_mode
    return kw


@register
class CompileHandler(Handler):
    name = "compile"
    phase = COMPILE
    reversible = False

    def check(self, ctx: Context) -> list[str]:
        c = ctx.profile.compile
        if not c.enabled:
            return []
        if ctx.components().get("transformer") is None:
            return [f"compile.mode={c.mode}: this pipeline has no transformer"]
        if c.inductor_mode in ("reduce-overhead", "max-autotune") and c.mode == "regional":
            # Measured on the H200 (FLUX.1-dev, torch 2.11): every block of a class replays one CUDA
            # graph, so a block's output is overwritten by the next block's run and the first call raises
            # "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run".
            return [f"compile.inductor_mode={c.inductor_mode} with compile.mode=regional: the repeated blocks "
                    "share one CUDA graph and overwrite each other's outputs; use compile.mode=full, or "
                    "inductor_mode default or max-autotune-no-cudagraphs"]
        if c.inductor_mode in ("reduce-overhead", "max-autotune") and not ctx.on_gpu:
            return [f"compile.inductor_mode={c.inductor_mode} uses CUDA graphs; on CPU use default"]
        return []

    def apply(self, ctx: Context) -> None:
        import torch

        c = ctx.profile.compile
        if not c.enabled:
            return
        if ctx.on_gpu and not ctx.hardware.can_compile:
            # Without Triton the first call would fail, minutes after loading; the profile runs eager.
            q = ctx.profile.transformer.quantize
            slow = (f"; transformer.quantize={q.method} is slow eager (W8A8 int8 linears ran 5x slower than int8 "
                    "weights on the H200): consider int8_weight" if q is not None and q.method == "int8_dynamic"
                    else "")
            ctx.skip(self.name, "transformer", "Triton is not installed, and torch.compile needs it on a CUDA GPU "
                     "(Linux: pip install triton; Windows: pip install triton-windows); running eager" + slow)
            return
        if c.inductor_flags:
            for key, value in INDUCTOR_FLAGS.items():
                setattr(torch._inductor.config, key, value)
        q = ctx.profile.transformer.quantize
        if q is not None and q.method.startswith("int8"):
            # torchao's int8 kernels expect the int_mm and its rescale fused (what its own quantize_
            # would set; fluxtune passes set_inductor_config=False so that compile owns inductor flags).
            torch._inductor.config.force_fuse_int_mm_with_mul = True
            torch._inductor.config.use_mixed_mm = True
        if c.recompile_limit is not None:
            torch._dynamo.config.recompile_limit = c.recompile_limit
        if c.dynamic:
            # Without this, shapes that happen to be equal are specialised together and recompile later.
            torch.fx.experimental._config.use_duck_shape = False
        t = ctx.components()["transformer"]
        t0 = time.perf_counter()
        kw = _kwargs(ctx)
        streamed = streamer_of(t) is not None
        if c.mode == "full":
            t.compile(**kw)
            detail = "whole transformer"
        elif hasattr(t, "compile_repeated_blocks") and t._repeated_blocks and not streamed:
            t.compile_repeated_blocks(**kw)
            detail = f"repeated blocks ({', '.join(t._repeated_blocks)})"
        else:
            # DiT has no _repeated_blocks; streamed blocks keep their hooks outside the compiled code.
            from fluxtune.tuning.streaming import repeated_blocks

            blocks = repeated_blocks(t)
            for _, block in blocks:
                if streamed:
                    block.forward = torch.compile(block.forward, **kw)
                else:
                    block.compile(**kw)
            detail = f"{len(blocks)} blocks one by one"
        mode = c.inductor_mode
        ctx.report.add(self.name, "transformer", f"{c.mode}: {detail}, mode={mode}, fullgraph={c.fullgraph} "
                       "(compiles lazily on the first call)", seconds=time.perf_counter() - t0)
        vae = ctx.components().get("vae")
        if c.vae_decode and vae is not None:
            vae.decode = torch.compile(vae.decode, **kw)
            ctx.report.add(self.name, "vae", "decode compiled")
