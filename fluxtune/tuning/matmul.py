"""matmul.fp16_accumulation: cuBLAS float16 GEMMs accumulating in float16.

GeForce cards (and the A10G) run float16/bfloat16 tensor-core GEMMs with float32 accumulation at half
their float16-accumulate rate: an RTX 4090 peaks at 165 TFLOPS one way and 330 the other (Ada
whitepaper), an RTX 3090 at 71 and 142. ``torch.backends.cuda.matmul.allow_fp16_accumulation`` (torch
>= 2.7) asks cuBLAS for the second; it only reaches components computing in float16 (bfloat16 has no
float16 accumulate), and only their cuBLAS GEMMs: fp8/int8 dynamic GEMMs and attention are unchanged.
It is ComfyUI's ``--fast fp16_accumulation``. Data-center cards run both at one rate: numerics only.
"""

from __future__ import annotations

from typing import Any

from fluxtune.tuning.base import PRECISION, Context, Handler, register
from fluxtune.tuning.precision import floating_dtype

_DYNAMIC = ("fp8_dynamic", "int8_dynamic")
"""Quantization methods whose GEMMs are not float16 cuBLAS GEMMs (fp8 / int8 inputs)."""


def _flag() -> Any:
    import torch

    return torch.backends.cuda.matmul


def _dtypes(ctx: Context) -> dict[str, str]:
    """Each component's compute dtype under the profile: its ``dtype`` knob, else what its weights say."""
    return {name: ctx.profile.component(name).dtype or str(floating_dtype(module)).replace("torch.", "")
            for name, module in ctx.components().items()}


def fp16_components(ctx: Context) -> list[str]:
    """The components that will compute in float16 under the profile, with GEMMs the flag reaches."""
    out = []
    for name, dtype in _dtypes(ctx).items():
        q = ctx.profile.component(name).quantize
        if dtype == "float16" and (q is None or q.method not in _DYNAMIC):
            out.append(name)
    return out


def speedup_note(hardware: Any) -> str:
    """What the flag buys on this GPU per the GPU table."""
    spec = hardware.spec()
    if spec is None:
        return "the GPU is not in the table: speed gain unknown"
    acc32, acc16 = spec.rate("bf16"), spec.rate("fp16acc")
    if not acc32 or not acc16 or acc16 <= acc32 * 1.05:
        return f"{spec.name} runs float32 accumulate at the same rate: numerics change, speed does not"
    return f"{spec.name}: {acc16:g} against {acc32:g} dense TFLOPS (float16 against float32 accumulate)"


@register
class MatmulHandler(Handler):
    name = "matmul"
    phase = PRECISION + 1  # after the casts it depends on; a process-wide flag, so before anything runs

    def check(self, ctx: Context) -> list[str]:
        if not ctx.profile.matmul.fp16_accumulation:
            return []
        if not hasattr(_flag(), "allow_fp16_accumulation"):
            import torch

            return [f"matmul.fp16_accumulation=true needs torch >= 2.7 (torch.backends.cuda.matmul."
                    f"allow_fp16_accumulation); this is torch {torch.__version__}: upgrade torch or drop it"]
        if not fp16_components(ctx):
            dtypes = ", ".join(f"{n} {d}" for n, d in _dtypes(ctx).items())
            return [f"matmul.fp16_accumulation=true: no component runs float16 GEMMs ({dtypes}); set "
                    "transformer.dtype: float16 (keep T5 and LLM text encoders in bfloat16: they overflow in "
                    "float16), and no fp8_dynamic/int8_dynamic on it"]
        return []

    def apply(self, ctx: Context) -> None:
        if not ctx.profile.matmul.fp16_accumulation:
            return
        names = ", ".join(fp16_components(ctx))
        if not ctx.on_gpu:
            ctx.skip(self.name, names, "fp16 accumulation is a cuBLAS setting: no effect on CPU")
            return
        flag = _flag()
        before = flag.allow_fp16_accumulation
        flag.allow_fp16_accumulation = True

        def undo() -> None:
            flag.allow_fp16_accumulation = before

        ctx.undo.append((self.name, undo))
        ctx.report.add(self.name, names, "float16 GEMMs accumulate in float16 (process-wide; "
                       f"{speedup_note(ctx.hardware)})")
