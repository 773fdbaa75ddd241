"""cache: reuse transformer computation across denoising steps (first-block, TaylorSeer, MagCache)."""

from __future__ import annotations

from typing import Any

from fluxtune.knobs import FirstBlockCache, MagCache, TaylorSeerCache
from fluxtune.tuning.base import CACHE, Context, Handler, register

_HOOKS = {
    "first_block": ("fbc_leader_block_hook", "fbc_block_hook"),
    "taylorseer": ("taylorseer_cache",),
    "magcache": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
}


def diffusers_cache_config(ctx: Context) -> Any:
    """The diffusers config object for the profile's cache section."""
    import torch
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    c = ctx.profile.cache
    if isinstance(c, FirstBlockCache):
        return FirstBlockCacheConfig(threshold=c.threshold)
    if isinstance(c, TaylorSeerCache):
        return TaylorSeerCacheConfig(
            cache_interval=c.cache_interval,
            disable_cache_before_step=c.disable_cache_before_step,
            disable_cache_after_step=c.disable_cache_after_step,
            max_order=c.max_order,
            taylor_factors_dtype=torch.float32,  # bf16 factors lose the small differences TaylorSeer needs
        )
    assert isinstance(c, MagCache)
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    # Retention is counted against num_inference_steps, so it must be the steps the pipeline runs.
    return MagCacheConfig(
        threshold=c.threshold, max_skip_steps=c.max_skip_steps, retention_ratio=c.retention_ratio,
        num_inference_steps=ctx.profile.generation.steps, mag_ratios=FLUX_MAG_RATIOS,
    )


def magcache_schedule(cache: MagCache, steps: int) -> list[bool]:
    """Which of ``steps`` denoising steps a MagCache profile computes (True) or skips, as diffusers decides.

    MagCache decides from precomputed magnitude ratios (FLUX.1's, interpolated to the step count), not from
    the run's values, so the schedule is known before the run: diffusers' ``MagCacheHeadHook`` logic, step by
    step (a test holds it to the real hook's calls)."""
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    config = MagCacheConfig(threshold=cache.threshold, max_skip_steps=cache.max_skip_steps,
                            retention_ratio=cache.retention_ratio, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)
    ratios = [float(r) for r in getattr(config, "mag_ratios")]  # noqa: B009  (interpolated to the steps)
    retention = int(cache.retention_ratio * steps + 0.5)
    ratio, skipped, err, residual = 1.0, 0, 0.0, False
    out = []
    for i in range(steps):
        compute = True
        if i >= retention:
            ratio *= ratios[i] if i < len(ratios) else 1.0
            skipped += 1
            err += abs(1.0 - ratio)
            if residual and err <= cache.threshold and skipped <= cache.max_skip_steps:
                compute = False
            else:
                ratio, skipped, err = 1.0, 0, 0.0
        residual = residual or compute
        out.append(compute)
    return out


def taylorseer_schedule(cache: TaylorSeerCache, steps: int) -> list[bool]:
    """Which steps a TaylorSeer profile computes (True) or extrapolates, as diffusers' ``TaylorSeerCacheHook``
    decides: every step before ``disable_cache_before_step``, then one in ``cache_interval`` (counted from the
    step after the warm-up), and every step from ``disable_cache_after_step`` on."""
    out = []
    for i in range(steps):
        warmup = i < cache.disable_cache_before_step
        interval = (i - cache.disable_cache_before_step - 1) % cache.cache_interval == 0
        cooldown = cache.disable_cache_after_step is not None and i >= cache.disable_cache_after_step
        out.append(warmup or interval or cooldown)
    return out


def family_problem(kind: str, family: str) -> str | None:
    """Why a cache kind does not run on a pipeline family, or None (the search offers only those that run)."""
    if kind == "magcache" and family != "flux":
        return ("cache.kind=magcache needs magnitude ratios, which diffusers ships for FLUX only; "
                f"use {'taylorseer' if family == 'flux2' else 'first_block or taylorseer'}")
    if kind == "first_block" and family == "flux2":
        # FLUX.2's double blocks return (text, image) and its single blocks one joined tensor, so the head
        # block's residual cannot be applied at the tail: a TypeError at the first cached step.
        return ("cache.kind=first_block does not run on FLUX.2 in diffusers (its double and single blocks return "
                "different outputs; huggingface/diffusers#14280); use taylorseer")
    return None


@register
class CacheHandler(Handler):
    name = "cache"
    phase = CACHE

    def check(self, ctx: Context) -> list[str]:
        kind = ctx.profile.cache.kind
        if kind == "none":
            return []
        t = ctx.components().get("transformer")
        if t is None:
            return [f"cache.kind={kind}: this pipeline has no transformer to cache; use cache.kind=none"]
        if ctx.family not in ("flux", "dit") and not hasattr(t, "enable_cache"):
            return [f"cache.kind={kind}: {type(t).__name__} has no cache support; use cache.kind=none"]
        problem = family_problem(kind, ctx.family)
        return [problem] if problem else []

    def apply(self, ctx: Context) -> None:
        kind = ctx.profile.cache.kind
        if kind == "none":
            return
        t = ctx.components()["transformer"]
        config = diffusers_cache_config(ctx)
        if hasattr(t, "enable_cache"):
            t.enable_cache(config)
            ctx.undo.append((self.name, t.disable_cache))
        else:
            # DiT is no CacheMixin: apply the hooks directly, give them a context, reset them per call.
            from diffusers.hooks import HookRegistry, apply_first_block_cache, apply_taylorseer_cache
            from diffusers.hooks.hooks import CacheContext, _set_cache_context

            applier: Any = {"first_block": apply_first_block_cache, "taylorseer": apply_taylorseer_cache}[kind]
            applier(t, config)
            registry = HookRegistry.check_if_exists_or_initialize(t)

            def fresh_state() -> None:
                # Resetting also clears the context, so set it again after (DiT runs one batched pass: "cond").
                registry.reset_stateful_hooks()
                _set_cache_context(t, CacheContext("cond"))

            ctx.before_call.append(fresh_state)

            def undo() -> None:
                for hook in _HOOKS[kind]:
                    registry.remove_hook(hook, recurse=True)

            ctx.undo.append((self.name, undo))
        detail = ", ".join(f"{k}={v}" for k, v in ctx.profile.cache.model_dump().items() if k != "kind")
        ctx.report.add(self.name, "transformer", f"{kind} ({detail})")
