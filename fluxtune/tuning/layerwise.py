"""layerwise_casting: store weights in fp8 and upcast each layer for its forward (memory only)."""

from __future__ import annotations

import re
from typing import Any

from fluxtune.tuning.base import CASTING, Context, Handler, register, torch_dtype


def default_skip(module: Any) -> tuple[str, ...]:
    """diffusers' default skip patterns, for a model that is not a diffusers model (a transformers text
    encoder), plus two kinds of module whose fp8 storage breaks the pipeline:

    - the one holding its first floating-point parameter: transformers' ``model.dtype`` is that
      parameter's dtype, and pipelines build the prompt embeddings (FLUX.1: the latents too) in
      ``text_encoder.dtype``, which fp8 storage would make fp8;
    - the modules it keeps in float32 (T5's ``wo``, which casts its input to its own weight's dtype)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    keep = [*(getattr(module, "_keep_in_fp32_modules", None) or ()),
            *(getattr(module, "_keep_in_fp32_modules_strict", None) or ())]
    patterns = [rf"(^|\.){re.escape(name)}$" for name in keep]
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    # Every module holding it: a tied embedding (T5's shared and encoder.embed_tokens) is one weight in two.
    patterns += [rf"^{re.escape(n)}$" for n, m in module.named_modules(remove_duplicate=False)
                 if n and any(p is first for p in m.parameters(recurse=False))]
    return (*DEFAULT_SKIP_MODULES_PATTERN, *patterns)


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
                                        skip_modules_pattern=lc.skip if lc.skip is not None else default_skip(module))
            ctx.report.add(self.name, name, f"weights stored as {lc.storage}, computed in {compute}".replace("torch.", ""))
