"""attention.backend: which diffusers attention kernel the transformer dispatches to."""

from __future__ import annotations

from fluxtune.tuning.base import ATTENTION, Context, Handler, register


def known_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(b.value for b in AttentionBackendName)


def reset_default_backend() -> None:
    """Put diffusers' process-wide active attention backend back to native.

    ``set_attention_backend`` also sets it, and ``reset_attention_backend()`` leaves it set
    (diffusers-knobs.md §5), so a later pipeline in the same process would run on it."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


@register
class AttentionHandler(Handler):
    name = "attention"
    phase = ATTENTION

    def check(self, ctx: Context) -> list[str]:
        backend = ctx.profile.attention.backend
        if backend == "native":
            return []
        names = known_backends()
        if backend not in names:
            public = [n for n in names if not n.startswith("_")]
            return [f"attention.backend={backend!r} is not a diffusers backend; known: {', '.join(public)}"]
        t = ctx.components().get("transformer")
        if t is None or not hasattr(t, "set_attention_backend") or ctx.family == "dit":
            return [
                f"attention.backend={backend!r}: this pipeline's attention calls SDPA directly, so a backend "
                "choice has no effect; use native"
            ]
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
        )

        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except (RuntimeError, ImportError, ValueError) as e:
            return [f"attention.backend={backend!r} is not available here: {str(e).splitlines()[0]}; use native"]
        return []

    def apply(self, ctx: Context) -> None:
        backend = ctx.profile.attention.backend
        t = ctx.components().get("transformer")
        if backend == "native" or t is None:
            return
        t.set_attention_backend(backend)

        def undo() -> None:
            t.reset_attention_backend()
            reset_default_backend()

        ctx.undo.append((self.name, undo))
        ctx.report.add(self.name, "transformer", f"backend {backend}")
