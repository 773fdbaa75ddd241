"""generation: the profile's call settings become the pipeline's defaults, and oversize calls are refused.

``pipe(prompt)`` then runs with the profile's steps, guidance and size; explicit arguments still win.
The instance's class is swapped for a same-named subclass whose ``__call__`` fills the defaults,
because Python looks ``__call__`` up on the type, never on the instance.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fluxtune.errors import BudgetExceededError
from fluxtune.tuning.base import GENERATION, Context, Handler, register
from fluxtune.tuning.state import BASE_ATTR, base_class, call_state

if TYPE_CHECKING:
    from fluxtune.knobs import Generation

_KWARG = {  # profile field -> pipeline __call__ parameter
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "height": "height",
    "width": "width",
    "max_sequence_length": "max_sequence_length",
    "images_per_prompt": "num_images_per_prompt",
    "negative_prompt": "negative_prompt",
    "true_cfg_scale": "true_cfg_scale",
}
_TUNED: dict[type, type] = {}


def _count(value: Any) -> int:
    if value is None:
        return 1
    return len(value) if isinstance(value, list | tuple) else 1


def pipeline_call_params(class_name: str) -> Mapping[str, inspect.Parameter] | None:
    """The ``__call__`` parameters of a diffusers pipeline class named ``class_name``; None where this
    diffusers has no such class."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    return inspect.signature(cls.__call__).parameters if cls is not None else None


def true_cfg_problem(params: Mapping[str, inspect.Parameter], g: Generation, pipeline: str) -> str | None:
    """Why the profile's true-CFG settings cannot work on a pipeline with these ``__call__`` parameters."""
    for field in ("negative_prompt", "true_cfg_scale"):
        value = getattr(g, field)
        if value is not None and field not in params:
            return (f"generation.{field}={value!r}: {pipeline} has no {field} (its guidance is "
                    "guidance_scale or distilled); leave it unset")
    # A pipeline with negative_prompt but no true_cfg_scale (PixArt, SD3, ...) batches classic CFG by
    # guidance_scale: the negative prompt is an ordinary default there.
    if g.negative_prompt is not None and "true_cfg_scale" in params and not true_cfg_passes(params, g) > 1:
        return (f"generation.negative_prompt is set but true_cfg_scale={_scale(params, g)} runs no true CFG on "
                f"{pipeline}; set generation.true_cfg_scale above 1 (e.g. 4.0) or leave negative_prompt unset")
    return None


def _scale(params: Mapping[str, inspect.Parameter], g: Generation) -> float:
    if g.true_cfg_scale is not None:
        return g.true_cfg_scale
    default = params["true_cfg_scale"].default if "true_cfg_scale" in params else None
    return float(default) if isinstance(default, int | float) else 1.0


def true_cfg_passes(params: Mapping[str, inspect.Parameter], g: Generation) -> int:
    """Transformer passes per denoising step of a call with the profile's defaults: 2 where the pipeline
    runs true CFG (it takes ``negative_prompt``, one is set, and the scale is above 1, as diffusers' Qwen-Image
    and FLUX.1 pipelines decide), else 1. Each pass is a separate forward at the batch of one call."""
    if g.negative_prompt is None or "negative_prompt" not in params or "true_cfg_scale" not in params:
        return 1
    return 2 if _scale(params, g) > 1 else 1


def _tuned_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    state = call_state(self)
    base = base_class(self)
    if state is None:  # a failed apply left no profile: run the pipeline as it is
        return base.__call__(self, *args, **kwargs)
    sig = inspect.signature(base.__call__)
    bound = sig.bind_partial(self, *args, **kwargs).arguments
    bound.pop("self", None)
    for key, value in state.defaults.items():
        bound.setdefault(key, value)
    state.guard(bound)
    for fn in state.before_call:
        fn()
    try:
        return base.__call__(self, **bound)
    finally:
        for fn in state.after_call:
            fn()


def tuned_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` applies the profile's defaults."""
    if hasattr(cls, BASE_ATTR):
        return cls
    if cls not in _TUNED:
        _TUNED[cls] = type(cls.__name__, (cls,), {
            "__call__": _tuned_call, BASE_ATTR: cls, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        })
    return _TUNED[cls]


@register
class GenerationHandler(Handler):
    name = "generation"
    phase = GENERATION

    def check(self, ctx: Context) -> list[str]:
        g = ctx.profile.generation
        if ctx.family == "dit":
            t = ctx.components().get("transformer")
            native = int(t.config.sample_size) * 8 if t is not None else None
            for field in ("height", "width"):
                value = getattr(g, field)
                if value is not None and native is not None and value != native:
                    return [f"generation.{field}={value}: this DiT draws {native}x{native} only (its sample_size); "
                            f"set generation.{field}={native} or leave it unset"]
        params = inspect.signature(base_class(ctx.pipe).__call__).parameters
        cfg = true_cfg_problem(params, g, base_class(ctx.pipe).__name__)
        if cfg is not None:
            return [cfg]
        if g.max_sequence_length != 512 and "max_sequence_length" not in params:
            return [f"generation.max_sequence_length={g.max_sequence_length}: this pipeline has no text sequence "
                    "length; leave it at 512"]
        return []

    def apply(self, ctx: Context) -> None:
        g = ctx.profile.generation
        params = inspect.signature(base_class(ctx.pipe).__call__).parameters
        defaults: dict[str, Any] = {}
        for field, kwarg in _KWARG.items():
            value = getattr(g, field)
            if value is not None and kwarg in params:
                defaults[kwarg] = value
        ctx.pipe.__class__ = tuned_class(type(ctx.pipe))
        summary = "call defaults: " + ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                                for k, v in defaults.items())
        if true_cfg_passes(params, g) > 1:
            summary += "; true CFG: two transformer passes a step"
        ctx.report.add(self.name, "pipeline", summary)
        ctx.call_defaults.update(defaults)


class CallState:
    """What the wrapped ``__call__`` needs: defaults, hooks around the call, and the size guard."""

    def __init__(self, ctx: Context) -> None:
        self.profile = ctx.profile
        self.family = ctx.family
        self.defaults = dict(ctx.call_defaults)
        self.before_call = list(ctx.before_call)
        self.after_call = list(ctx.after_call)
        self.undo = list(ctx.undo)
        self.report = ctx.report
        b = ctx.profile.budget
        # The call size is a limit only where the budget holds a cap (enforced, on a GPU); elsewhere
        # the profile's size is a default, and a larger call is the caller's choice.
        self.capped = b.vram is not None and b.enforce and ctx.on_gpu

    def guard(self, kwargs: dict[str, Any]) -> None:
        """Refuse a call larger than the one the profile's budget was validated for."""
        p = self.profile
        g = p.generation
        if p.budget.vram is None or not getattr(self, "capped", True):
            return
        lift = ("; to validate a larger call, apply the profile with the larger generation.{field} (an override, "
                "e.g. `fluxtune generate PROFILE generation.{field}=N`, or budget.enforce=false) and check its "
                "peak with fluxtune bench")
        if self.family == "dit":
            images, limit = _count(kwargs.get("class_labels")), g.images_per_prompt
            if images > limit:
                raise BudgetExceededError(
                    f"this call asks for {images} images; the profile was validated for at most "
                    f"generation.images_per_prompt={limit} within budget.vram" + lift.format(field="images_per_prompt")
                )
            return
        prompts = kwargs.get("prompt")
        n_prompts = _count(prompts) if prompts is not None else 1
        images = n_prompts * int(kwargs.get("num_images_per_prompt") or 1)
        if images > g.images_per_prompt:
            raise BudgetExceededError(
                f"this call asks for {images} images at once; the profile was validated for "
                f"generation.images_per_prompt={g.images_per_prompt} within budget.vram"
                + lift.format(field="images_per_prompt")
            )
        if g.height is not None and g.width is not None:
            h, w = kwargs.get("height") or g.height, kwargs.get("width") or g.width
            if h * w > g.height * g.width:
                raise BudgetExceededError(
                    f"this call asks for {w}x{h} pixels; the profile was validated for at most "
                    f"{g.width}x{g.height} (generation.width x generation.height) within budget.vram"
                    + lift.format(field="width/height")
                )
        seq = kwargs.get("max_sequence_length")
        if seq is not None and seq > g.max_sequence_length:
            raise BudgetExceededError(
                f"this call asks for max_sequence_length={seq}; the profile was validated for "
                f"generation.max_sequence_length={g.max_sequence_length}" + lift.format(field="max_sequence_length")
            )
