"""precision: the compute dtype of each component, and casts where components of two dtypes meet.

A pipeline hands one component's output to the next as it is: FLUX.1 makes its latents in the T5
embeddings' dtype and decodes them without a cast, so a transformer in float16 beside a bfloat16 T5,
or a float32 VAE beside a bfloat16 transformer, stops at the first matmul with a dtype mismatch. When
the profile leaves the components in more than one dtype, the denoiser and the VAE get their inputs
cast to their own dtype (what a pipeline loaded wholly in that dtype would pass them) and the
denoiser's output cast back to its caller's dtype (the scheduler's latents keep theirs).
"""

from __future__ import annotations

import functools
from typing import Any

from fluxtune.tuning.base import PRECISION, Context, Handler, register, torch_dtype

BOUNDARY_HOOK = "fluxtune_dtype_boundary"
_VAE_ENTRIES = ("encode", "decode")
"""The VAE methods pipelines call (not ``forward``): their tensor inputs are cast."""


def floating_dtype(module: Any) -> Any:
    """The dtype a module computes in: its first floating-point parameter's (None without one), or, when that
    is fp8 storage, the compute dtype of the layerwise-casting hooks that upcast it (None if there are none)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None or dtype.itemsize > 1:
        return dtype
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            return hook.compute_dtype
    return None


def cast_floating(value: Any, dtype: Any) -> Any:
    """``value`` with its floating tensors (top level, or in a top-level list/tuple) cast to ``dtype``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        cast = [cast_floating(v, dtype) for v in value]
        return cast if isinstance(value, list) else type(value)(cast) if type(value) is tuple else value
    return value


def _first_floating(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import torch

    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


def _boundary_hook(dtype: Any) -> Any:
    from diffusers.hooks import ModelHook
    from diffusers.utils import BaseOutput

    class DtypeBoundary(ModelHook):
        """Cast a component's floating inputs to its dtype and its outputs back to the caller's."""

        def __init__(self) -> None:
            super().__init__()
            self.caller: list[Any] = []  # a stack: a forward may run inside another (nothing does today)

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            self.caller.append(_first_floating(args, kwargs))
            return (tuple(cast_floating(a, dtype) for a in args),
                    {k: cast_floating(v, dtype) for k, v in kwargs.items()})

        def post_forward(self, module: Any, output: Any) -> Any:
            caller = self.caller.pop()
            if caller is None or caller == dtype:
                return output
            if isinstance(output, BaseOutput):
                for key in list(output.keys()):
                    output[key] = cast_floating(output[key], caller)
                return output
            return cast_floating(output, caller)

    return DtypeBoundary()


def _cast_vae_entries(vae: Any, dtype: Any) -> None:
    """Wrap the VAE's ``encode``/``decode`` (its pipeline entry points) to cast tensor inputs to ``dtype``.

    Its images and latents come out in its own dtype: the pipelines convert them (to float32 for images)."""
    for name in _VAE_ENTRIES:
        method = getattr(vae, name, None)
        if method is None or getattr(method, "_fluxtune_cast", None) is not None:
            continue

        @functools.wraps(method)
        def entry(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            return _method(*(cast_floating(a, dtype) for a in args),
                           **{k: cast_floating(v, dtype) for k, v in kwargs.items()})

        entry._fluxtune_cast = dtype  # type: ignore[attr-defined]
        setattr(vae, name, entry)


def _cast(module: Any, dtype: Any) -> int:
    """``module.to(dtype)``, keeping the modules the model lists in ``_keep_in_fp32_modules`` in float32 as
    ``from_pretrained(torch_dtype=...)`` does; returns how many parameters stayed float32.

    diffusers warns on every such ``to()`` that those modules may be cast, even for a model that lists none
    ("should be kept in float32: []"): the warning is silenced because the cast here keeps them."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    kept = 0
    if keep and dtype in (torch.float16, torch.bfloat16):
        for name, param in module.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
                kept += 1
    return kept


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
        compute: dict[str, Any] = {}
        for name, module in ctx.components().items():
            dtype = ctx.profile.component(name).dtype
            current = floating_dtype(module)
            compute[name] = torch_dtype(dtype) if dtype is not None else current
            if dtype is None:
                continue
            if current == torch_dtype(dtype):
                ctx.report.add(self.name, name, f"already {dtype}")
                continue
            kept = _cast(module, torch_dtype(dtype))
            ctx.report.add(self.name, name, f"{current} -> {dtype}".replace("torch.", "")
                           + (f" ({kept} parameters of its float32 modules kept in float32)" if kept else ""))
        if len({d for d in compute.values() if d is not None}) > 1:
            self._add_boundaries(ctx, compute)

    @staticmethod
    def _add_boundaries(ctx: Context, compute: dict[str, Any]) -> None:
        from diffusers.hooks import HookRegistry

        comps = ctx.components()
        t, vae = comps.get("transformer"), comps.get("vae")
        if t is not None and compute.get("transformer") is not None:
            registry = HookRegistry.check_if_exists_or_initialize(t)
            if registry.get_hook(BOUNDARY_HOOK) is None:
                registry.register_hook(_boundary_hook(compute["transformer"]), BOUNDARY_HOOK)
        if vae is not None and compute.get("vae") is not None:
            _cast_vae_entries(vae, compute["vae"])
        groups: dict[str, list[str]] = {}
        for name, dtype in compute.items():
            if dtype is not None:
                groups.setdefault(str(dtype).replace("torch.", ""), []).append(name)
        mixed = "; ".join(f"{d}: {', '.join(names)}" for d, names in groups.items())
        ctx.report.add("precision", "pipeline", f"components in more than one dtype ({mixed}): the transformer's "
                       "inputs and the VAE's are cast to their dtype, the transformer's output back")
