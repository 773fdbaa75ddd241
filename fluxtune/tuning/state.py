"""The state fluxtune keeps on objects it does not own, and the one way to read, write or drop it.

``apply`` hangs a :class:`~fluxtune.tuning.generation.CallState` on the pipeline (``_fluxtune``), LoRA
switching a ``LoraState`` (``_fluxtune_lora``), partial residency its streamer on the module it streams
(``_fluxtune_streamer``), and the call wrapper its base class on the tuned subclass (``_fluxtune_base``).
Nothing else reads or writes these names, so what "tuned" means lives in this one module.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxtune.tuning.generation import CallState
    from fluxtune.tuning.lora import LoraState
    from fluxtune.tuning.materialize import WeightPlan
    from fluxtune.tuning.streaming import BlockStreamer

CALL_ATTR = "_fluxtune"
LORA_ATTR = "_fluxtune_lora"
STREAMER_ATTR = "_fluxtune_streamer"
BASE_ATTR = "_fluxtune_base"
"""Set on the tuned subclass (a class attribute): the pipeline's own class."""
WEIGHTS_ATTR = "_fluxtune_weights"
"""Set on a component whose weights placement must still read or quantize (a WeightPlan)."""
BROKEN_ATTR = "_fluxtune_broken"
"""Set on a component whose weights a failed ``apply`` changed (the reason); fresh components clear it."""

__all__ = ["BASE_ATTR", "BROKEN_ATTR", "base_class", "broken_reason", "call_state", "discard", "is_tuned", "lora_state",
           "mark_broken", "reset", "set_call_state", "set_lora_state", "set_streamer", "set_weight_plan", "streamer_of",
           "weight_plan"]


def call_state(pipe: Any) -> CallState | None:
    """What ``apply`` left on ``pipe`` (profile, call defaults, undo list), or None when untuned."""
    return getattr(pipe, CALL_ATTR, None)


def set_call_state(pipe: Any, state: CallState) -> None:
    setattr(pipe, CALL_ATTR, state)


def is_tuned(pipe: Any) -> bool:
    """Whether ``apply`` has already run on this pipeline."""
    return call_state(pipe) is not None


def mark_broken(module: Any, reason: str) -> None:
    setattr(module, BROKEN_ATTR, reason)


def broken_reason(pipe: Any) -> str | None:
    """Why a failed ``apply`` left one of the pipeline's components changed, or None."""
    parts: dict[str, Any] = getattr(pipe, "components", {}) or {}
    return next((getattr(m, BROKEN_ATTR) for m in parts.values() if getattr(m, BROKEN_ATTR, None)), None)


def lora_state(pipe: Any) -> LoraState | None:
    """The LoRAs applied to ``pipe`` and how (None: none applied)."""
    return getattr(pipe, LORA_ATTR, None)


def set_lora_state(pipe: Any, state: LoraState) -> None:
    setattr(pipe, LORA_ATTR, state)


def streamer_of(module: Any) -> BlockStreamer | None:
    """The partial-residency streamer placed on ``module``, if any."""
    return getattr(module, STREAMER_ATTR, None)


def set_streamer(module: Any, streamer: BlockStreamer) -> None:
    setattr(module, STREAMER_ATTR, streamer)


def weight_plan(module: Any) -> WeightPlan | None:
    """What placement must still do to ``module``'s weights (read them, quantize them), or None."""
    return getattr(module, WEIGHTS_ATTR, None)


def set_weight_plan(module: Any, plan: WeightPlan | None) -> None:
    if plan is None:
        module.__dict__.pop(WEIGHTS_ATTR, None)
    else:
        setattr(module, WEIGHTS_ATTR, plan)


def base_class(pipe: Any) -> type:
    """The pipeline's own class, under fluxtune's call wrapper if there is one."""
    return getattr(type(pipe), BASE_ATTR, type(pipe))  # type: ignore[no-any-return]


def reset(pipe: Any) -> None:
    """Undo what ``apply`` did that outlives the pipeline's modules, and drop fluxtune's state.

    Runs the undo list in reverse (offload hooks, caches, the memory cap, diffusers' process-wide
    attention backend, ...), restores the pipeline's own class and forgets the LoRA state. Irreversible
    knobs (cast, quantized, compiled weights) stay: the caller replaces the modules.
    """
    state = call_state(pipe)
    if state is not None:
        for _, undo in reversed(state.undo):
            # A pipeline reset after a failed trial may be half-undone already; the rest still runs.
            with contextlib.suppress(Exception):
                undo()
    # The attention backend is process-wide in diffusers: a profile whose apply failed part-way has
    # no undo list, and the next pipeline in this process must still start on the default.
    from fluxtune.tuning.attention import reset_default_backend

    reset_default_backend()
    pipe.__class__ = base_class(pipe)
    for name in (CALL_ATTR, LORA_ATTR):
        pipe.__dict__.pop(name, None)


def discard(pipe: Any) -> list[str]:
    """Undo ``apply``'s process-wide effects (:func:`reset`), then free every tensor of the pipeline's
    modules, for a pipeline about to be replaced.

    Whatever still refers to a module afterwards (a hook registry, a closure, a traceback) holds an
    empty shell, not its weights: an H200 search lost the reference's whole pipeline this way (its
    page-locked host copies and its device tensors) to something that outlived the restore.
    Streamed weights are not copied back first, as :func:`reset` alone would.

    Returns:
        The components whose tensors were freed.
    """
    import torch

    modules = {name: c for name, c in (getattr(pipe, "components", {}) or {}).items() if isinstance(c, torch.nn.Module)}
    for module in modules.values():
        for sub in module.modules():
            streamer = sub.__dict__.get(STREAMER_ATTR)
            if streamer is not None:
                streamer.discard()  # its undo (remove) then finds nothing to put back
    reset(pipe)
    for module in modules.values():
        for sub in module.modules():
            for key in list(sub._parameters):
                sub._parameters[key] = None
            for key in list(sub._buffers):
                sub._buffers[key] = None
            for attr in (STREAMER_ATTR, WEIGHTS_ATTR):
                sub.__dict__.pop(attr, None)
    return sorted(modules)
